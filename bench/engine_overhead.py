"""The engine's time per output token against the bare decode step of the same worker, same run.

For each batch size B, B text requests (P prompt tokens -> O output tokens, `ignore_eos`) go through
the real engine at once, so B sequences decode together; TPOT p50 comes from the token events. The
bare step is the worker's CUDA-graph replay at batch B and the run's mean context, measured on that
worker between runs; the worker's full step (inputs set up, replay, sampling, tokens to the host)
is measured too, so the gap splits into the worker's share and the driver's. Both scheduling modes,
`--repeats` runs each. Per-batch idle gaps on the worker come from the engine's batch records.

    python bench/engine_overhead.py --batches 1,8,64 --out overhead.json                 # one GPU, LLaVA-1.5-7B shape
    python bench/engine_overhead.py --model tiny --device cpu --batches 1,8 --out o.json  # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.config import BackendConfig, DeploymentConfig, EngineConfig, PoolConfig  # noqa: E402
from epd.lifetime import LifetimeEvent as Ev  # noqa: E402
from epd.request import ImageInput, Request, SamplingParams  # noqa: E402

LAYOUTS = ("aggregated", "2E1P1D")


def worker_steps(worker, batch: int, context: int, iters: int) -> dict:
    """On the worker: its CUDA-graph replay alone, and its whole decode step (`_decode_compute`)."""
    import time

    import torch

    from epd.engine.worker import _Seq
    from epd.request import SamplingParams

    bs = worker.pool.kv_block_size
    per = -(-(context + 2) // bs)
    sync = torch.cuda.synchronize if worker.rt.device.type == "cuda" else (lambda: None)
    rids = [f"probe-{i}" for i in range(batch)]
    for i, rid in enumerate(rids):
        slot = i if worker.state is not None else None  # a hybrid LM: a state slot each (the run's are free between runs)
        worker.seqs[rid] = _Seq(
            list(range(i * per, (i + 1) * per)), context, 11, 1, SamplingParams(max_tokens=10**6, ignore_eos=True), state_slot=slot
        )
    out = {}
    try:
        worker._decode_compute(rids)
        sync()
        if worker.graphs is not None:
            graph = worker.graphs.graphs[min(s for s in worker.graphs.graphs if s >= batch)][0]
            graph.replay()
            sync()
            t = time.perf_counter()
            for _ in range(iters):
                graph.replay()
            sync()
            out["replay_ms"] = (time.perf_counter() - t) / iters * 1e3
        t = time.perf_counter()
        for _ in range(iters):
            worker._decode_compute(rids)
        sync()
        out["worker_step_ms"] = (time.perf_counter() - t) / iters * 1e3
    finally:
        for rid in rids:
            worker.seqs.pop(rid, None)
    return out


def tpots(events) -> list[float]:
    """Per request, the mean time between its decode steps' tokens (from the second token on: the
    first comes from prefill, and prefills of the batch's other requests may sit between)."""
    times: dict[str, list[float]] = {}
    for e in events:
        if e.kind == Ev.TOKEN:
            times.setdefault(e.request_id, []).append(e.time)
    return [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]


def idle_gaps(batches, iid: str) -> list[float]:
    """Time the worker sat between consecutive decode batches, while it had sequences to step (0 where
    the next step was launched before this one's tokens landed: their spans overlap)."""
    mine = [b for b in batches if b.instance == iid and b.kind == "DecodeBatch"]
    return [max(0.0, b.begin - a.end) for a, b in zip(mine, mine[1:])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="async,sync")
    ap.add_argument("--layout", default="aggregated", choices=LAYOUTS, help="2E1P1D: one GPU per worker, requests with an image")
    ap.add_argument("--out", default="overhead.json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = model_config(args.model) if args.model != "tiny" else model_config("tiny-llava")
    model = dataclasses.replace(model, device=args.device)
    per_seq = -(-(args.prompt + args.output + 2) // 16)
    gpu = 1 if args.device == "cuda" else 0
    pool = PoolConfig(
        kv_blocks=max(batches) * per_seq + 16,
        max_decode_seqs=max(batches),
        max_prefill_tokens=max(16384, args.prompt),
        num_gpus=gpu,
        num_cpus=2,
    )
    results = {"layout": args.layout, "model": args.model, "device": args.device, "prompt": args.prompt, "output": args.output, "runs": []}
    from epd.engine.core import EngineCore

    for mode in args.modes.split(","):
        transfer = "ipc" if gpu else "object_store"
        if args.layout == "aggregated":
            dep = DeploymentConfig(name="aggregated", aggregated=pool, async_scheduling=mode == "async", transfer=transfer)
        else:
            dep = DeploymentConfig(
                name="epd",
                encode=dataclasses.replace(pool, instances=2, kv_blocks=1, mm_blocks=1024),
                prefill=dataclasses.replace(pool, mm_blocks=1024),
                decode=dataclasses.replace(pool, mm_blocks=1),
                async_scheduling=mode == "async",
                transfer=transfer,
            )
        t0 = time.time()
        core = EngineCore(EngineConfig(model, dep, "ray", BackendConfig()))
        ready = time.time() - t0
        print(f"{mode}: engine ready in {ready:.1f} s (warm-up {core.warmup_s:.1f} s)", flush=True)
        iid = [i for i, inst in core.pipeline.instances.items() if "decode" in inst.roles][0]
        vocab = min(core.pipeline.text.vocab_size, 30000)
        try:
            for b in batches:
                mid = args.prompt + args.output // 2
                bare = core.executor.call_one(iid, "probe", worker_steps, b, mid, 50)
                for rep in range(args.repeats):
                    core.new_run()
                    reqs = [
                        Request(
                            f"b{b}-{rep}-{i}",
                            prompt_token_ids=tuple((i * 131 + j * 7) % (vocab - 20) + 10 for j in range(args.prompt)),
                            sampling=SamplingParams(max_tokens=args.output, ignore_eos=True),
                            images=(ImageInput(width=672, height=504, seed=i),) if args.layout != "aggregated" else (),
                        )
                        for i in range(b)
                    ]
                    for r in reqs:
                        core.add_request(r)
                    core.run_until_idle(600)
                    aborted = [o.abort_reason for o in core.pipeline.outputs.values() if o.finish_reason == "abort"]
                    if aborted:
                        raise RuntimeError(f"{len(aborted)} requests aborted: {aborted[0]}")
                    tp = tpots(core.pipeline.events)
                    fed = core.executor.call_one(iid, "probe", lambda w: w.device_fed)
                    gaps = idle_gaps(list(core.batches), iid)
                    row = {
                        "mode": mode,
                        "batch": b,
                        "repeat": rep,
                        "tpot_p50_ms": statistics.median(tp) * 1e3,
                        "gap_p50_ms": statistics.median(gaps) * 1e3 if gaps else None,
                        "device_fed_rows": fed,  # decode rows launched from the step before's tokens on the device (cumulative)
                        "ready_s": ready,
                        "warmup_s": core.warmup_s,
                        **bare,
                    }
                    ref = bare.get("replay_ms", bare["worker_step_ms"])
                    row["tpot_over_bare"] = row["tpot_p50_ms"] / ref
                    results["runs"].append(row)
                    print(
                        f"  {mode:5s} B={b:3d} #{rep}: TPOT p50 {row['tpot_p50_ms']:.2f} ms, "
                        f"bare replay {bare.get('replay_ms', float('nan')):.2f} ms, "
                        f"worker step {bare['worker_step_ms']:.2f} ms -> TPOT/bare {row['tpot_over_bare']:.2f}; "
                        f"worker idle between decode batches p50 {row['gap_p50_ms']:.3f} ms; device-fed rows {fed}",
                        flush=True,
                    )
        finally:
            core.close()
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
