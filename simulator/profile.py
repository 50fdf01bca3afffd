"""`+experiment=profile`: time the real engine's workers over a grid of batch shapes, fit the
simulator's per-stage latency models, report the fit error, and write the profile file."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from epd.config import PoolConfig, RunConfig
from epd.request import ImageInput, SamplingParams
from epd.stages.work import DecodeBatch, EncodeBatch, EncodeItem, NewDecodeSeq, PrefillBatch, PrefillItem
from epd.stages.worker import Worker
from simulator.latency import fit


def _median_span(fn, repeats: int) -> float:
    fn()  # warm-up
    spans = []
    for _ in range(repeats):
        r = fn()
        spans.append(r.span[1] - r.span[0])
    return statistics.median(spans)


def measure(cfg: RunConfig) -> tuple[list[dict], float]:
    import ray

    grid = cfg.profile
    max_ctx = max(max(grid.decode_contexts) + 8, max(grid.prefill_lens) * max(grid.prefill_batch))
    pool = PoolConfig(kv_blocks=-(-max(grid.decode_batches) * max_ctx // 16) + 8, mm_blocks=4096, mm_block_tokens=64)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        w = Worker("profile", ("encode", "prefill", "decode"), cfg.model, pool, "object_store", threads=int(pool.num_cpus))
        fam, rows = w.rt.family, []
        img = ImageInput(width=cfg.workload.image_width, height=cfg.workload.image_height, seed=1)
        n_tok = fam.num_image_tokens(img.width, img.height)
        per_tile = getattr(fam, "tokens_per_tile", lambda: n_tok)()
        for n in grid.encode_batches:
            blocks = -(-n_tok // pool.mm_block_tokens)
            # compute only: what a send costs is the transfer model's (the simulator charges half to each side)
            items = [EncodeItem(f"e{i}", 0, img, n_tok, list(range(i * blocks, (i + 1) * blocks)), False) for i in range(n)]
            s = _median_span(lambda items=items: w.execute(EncodeBatch(items)), grid.repeats)
            rows.append({"stage": "encode", "tiles": n * n_tok // per_tile, "seconds": s})
        vocab = w.rt.text_cfg.vocab_size
        for length in grid.prefill_lens:
            for b in grid.prefill_batch:
                per = -(-length // 16)
                items = [
                    PrefillItem(
                        f"p{i}",
                        [5 + (i + j) % (vocab - 10) for j in range(length)],
                        [],
                        list(range(i * per, (i + 1) * per)),
                        SamplingParams(),
                        False,  # compute only, as for encode
                        False,
                    )
                    for i in range(b)
                ]
                s = _median_span(lambda items=items: w.execute(PrefillBatch(items)), grid.repeats)
                rows.append({"stage": "prefill", "tokens": b * length, "square": b * length * length, "seqs": b, "seconds": s})
        for ctx in grid.decode_contexts:
            for b in grid.decode_batches:
                per = -(-(ctx + 8) // 16)
                ids = [f"d{i}" for i in range(b)]
                new = [NewDecodeSeq(r, None, list(range(i * per, (i + 1) * per)), ctx, 7, SamplingParams()) for i, r in enumerate(ids)]
                w.execute(DecodeBatch(ids, new))

                def step(ids=ids, ctx=ctx):
                    for r in ids:  # keep the context fixed while timing
                        w.seqs[r].context_len = ctx
                    return w.execute(DecodeBatch(ids))

                s = _median_span(step, grid.repeats)
                w.release(ids)
                rows.append({"stage": "decode", "batch": b, "context": b * ctx, "seconds": s})
        for nbytes in grid.transfer_bytes:
            t = torch.zeros(nbytes // 4, dtype=torch.float32)
            times = []
            for _ in range(grid.repeats + 1):
                t0 = time.time()
                w.transfer.recv(w.transfer.send(t), torch.device("cpu"))
                times.append(time.time() - t0)
            rows.append({"stage": "transfer", "bytes": nbytes, "seconds": statistics.median(times[1:])})
        overhead = _rpc_overhead(ray, grid.repeats * 10)
    finally:
        if own_ray:
            ray.shutdown()
    return rows, overhead


def _rpc_overhead(ray, n: int) -> float:
    """A driver -> actor -> driver round trip with nothing to do: the per-batch cost outside compute."""

    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self, x):
            return x

    echo = Echo.remote()
    ray.get(echo.ping.remote(0))
    t0 = time.time()
    for i in range(n):
        ray.get(echo.ping.remote(i))
    ray.kill(echo)
    return (time.time() - t0) / n


def calibrate_overhead(cfg: RunConfig, coeffs: dict, n: int = 5, tokens: int = 32) -> float:
    """Per-batch cost outside the workers' compute, as the real engine shows it: requests arrive one
    at a time (the async path `epd.run` uses) through the configured deployment on Ray; the time
    between tokens beyond the fitted decode step is the driver round trip (RPC, scheduling, events)."""
    import dataclasses

    from epd.backends import EngineBackend
    from epd.experiment import make_requests
    from simulator.latency import DecodeShape, ProfiledModel

    model = ProfiledModel(coeffs)
    workload = dataclasses.replace(
        cfg.workload, arrival="constant", rate=2.0, num_requests=n + 1, output_tokens=tokens, output_tokens_max=None, ignore_eos=True
    )
    run_cfg = dataclasses.replace(cfg, workload=workload)
    result = EngineBackend(run_cfg).run(make_requests(run_cfg))
    gaps = []
    by_req = result.events.by_request()
    for rid in sorted(by_req)[1:]:  # the first request warms up
        times = [e.time for e in by_req[rid] if e.kind.value == "token"]
        prompt = result.outputs[rid].prompt_tokens
        for k in range(1, len(times)):
            gaps.append(times[k] - times[k - 1] - model.decode(DecodeShape(1, prompt + k)))
    return max(0.0, statistics.median(gaps))


def run_profile(cfg: RunConfig, out_dir: Path, resolved: dict) -> dict:
    rows, rpc = measure(cfg)
    coeffs, errors = fit(rows)
    overhead = calibrate_overhead(cfg, coeffs)
    profile = {
        "model": cfg.model.name,
        "device": cfg.model.device,
        "dtype": cfg.model.dtype,
        "threads": torch.get_num_threads(),
        "overhead": overhead,
        "rpc_overhead": rpc,
        "rows": rows,
        "coefficients": coeffs,
        "fit_error": errors,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(profile, indent=2))
    print(
        f"profile of {cfg.model.name} on {cfg.model.device}: {len(rows)} measurements, "
        f"per-batch overhead in the engine {overhead * 1e3:.2f} ms (bare RPC {rpc * 1e3:.2f} ms)"
    )
    for stage, err in errors.items():
        print(f"  {stage:9s} coefficients {[f'{c:.3g}' for c in coeffs[stage]]}  mean relative fit error {err * 100:.1f}%")
    print(f"  written to {out_dir / 'profile.json'}")
    return profile
