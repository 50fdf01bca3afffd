"""A worker lost under load on GPUs: what serving looks like while its replacement loads and rejoins.

    python bench/gpu_recovery.py --out recovery.json                       # LLaVA-1.5-7B shape, two instances on one GPU
    python bench/gpu_recovery.py --gpus-per-worker 1 --out recovery.json   # one GPU each (two GPUs)
    python bench/gpu_recovery.py --model tiny --device cpu --rate 4 --duration 20 --kill-at 6 --out r.json

Two aggregated instances serve requests (one image, a short prompt, `--output` tokens, `ignore_eos`)
arriving at `--rate` per second for `--duration` seconds. At `--kill-at` s one instance's worker process
is killed. Reported: requests lost (must be 0), finished and aborted; when the engine noticed the loss;
how long the replacement took to start (weights loaded, caches allocated, transfers connected) and
rejoin; output tokens/s in one-second bins and TTFT p50 before the loss, while replacing and after.
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


def _window(values: list[tuple[float, float]], lo: float, hi: float) -> float | None:
    inside = [v for t, v in values if lo <= t < hi]
    return statistics.median(inside) if inside else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus-per-worker", type=float, default=0.5)
    ap.add_argument("--rate", type=float, default=6.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--kill-at", type=float, default=15.0)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--kv-blocks", type=int, default=4096)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = model_config("tiny-llava" if args.model == "tiny" else args.model)
    model = dataclasses.replace(model, device=args.device)
    gpu = args.gpus_per_worker if args.device == "cuda" else 0
    pool = PoolConfig(instances=2, kv_blocks=args.kv_blocks, mm_blocks=1024, max_decode_seqs=64, num_gpus=gpu, num_cpus=2)
    dep = DeploymentConfig(name="aggregated", aggregated=pool, transfer="ipc" if gpu else "object_store")
    from epd.engine.core import EngineCore

    t0 = time.time()
    core = EngineCore(EngineConfig(model, dep, "ray", BackendConfig()))
    ready = time.time() - t0
    victim = "aggregated-1"
    n = int(args.rate * args.duration)
    vocab = min(core.pipeline.text.vocab_size, 20000)
    reqs = [
        Request(
            f"r{i}",
            prompt_token_ids=tuple((i * 131 + j * 7) % (vocab - 20) + 10 for j in range(48)),
            images=(ImageInput(width=640, height=480, seed=i),),
            sampling=SamplingParams(max_tokens=args.output, ignore_eos=True),
        )
        for i in range(n)
    ]
    try:
        core.new_run()
        start = time.time()
        sent, killed = 0, None
        while sent < n or core.has_work() or not any(e.kind == Ev.WORKER_REPLACED for e in core.pipeline.events):
            now = time.time() - start
            while sent < n and sent / args.rate <= now:
                core.add_request(reqs[sent])
                sent += 1
            if killed is None and now >= args.kill_at:
                import ray

                ray.kill(core.executor.actors[victim][0], no_restart=True)
                killed = time.time()
            core.step()
            if now > args.duration + 600:
                raise RuntimeError("the run did not end within 10 minutes of its last arrival")
        events = list(core.pipeline.events)
        kill_t = killed - core.origin
        lost_ev = next(e for e in events if e.kind == Ev.WORKER_LOST)
        back = next(e for e in events if e.kind == Ev.WORKER_REPLACED)
        outs = core.pipeline.outputs
        aborted = [o for o in outs.values() if o.finish_reason == "abort"]
        tokens = [e.time for e in events if e.kind in (Ev.FIRST_TOKEN, Ev.TOKEN)]
        first = {e.request_id: e.time for e in events if e.kind == Ev.FIRST_TOKEN}
        arrived = {e.request_id: e.time for e in events if e.kind == Ev.ISSUED}
        ttft = [(arrived[r], first[r] - arrived[r]) for r in first if r in arrived]
        end = max(tokens)
        bins = [sum(b <= t - tokens[0] < b + 1 for t in tokens) for b in range(int(end - tokens[0]) + 1)]
        result = {
            "model": args.model,
            "device": args.device,
            "gpus_per_worker": gpu,
            "rate": args.rate,
            "requests": n,
            "ended": len(outs),
            "finished": len(outs) - len(aborted),
            "aborted": len(aborted),
            "abort_reasons": sorted({o.abort_reason for o in aborted})[:5],
            "lost": n - len(outs),
            "redone": sum(1 for e in events if e.kind == Ev.PREEMPTED and e.data.get("cause") == "worker_lost"),
            "engine_ready_s": ready,
            "killed_at_s": kill_t,
            "noticed_after_s": lost_ev.time - kill_t,
            "replacement_took_s": back.data["took_s"],
            "rejoined_after_kill_s": back.time - kill_t,
            "served_by_the_replacement": len({e.request_id for e in events if e.time > back.time and e.instance == victim} - {""}),
            "tokens_per_s": {
                "before": sum(t < kill_t for t in tokens) / max(kill_t - tokens[0], 1e-9),
                "while_replacing": sum(kill_t <= t < back.time for t in tokens) / max(back.time - kill_t, 1e-9),
                "after": sum(t >= back.time for t in tokens) / max(end - back.time, 1e-9),
            },
            "ttft_p50_s": {
                "arrived_before": _window(ttft, 0, kill_t),
                "arrived_while_replacing": _window(ttft, kill_t, back.time),
                "arrived_after": _window(ttft, back.time, float("inf")),
            },
            "tokens_per_s_by_second": bins,
        }
        core.drain_check()
    finally:
        core.close()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "tokens_per_s_by_second"}, indent=2))


if __name__ == "__main__":
    main()
