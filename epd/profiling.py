"""`+experiment=profile`: time the real engine's workers over a grid of batch shapes, fit the
simulator's per-stage latency models, report the fit error, and write the profile file."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from epd.config import POOL_ROLES, PoolConfig, RunConfig
from epd.engine.worker import Worker
from epd.request import ImageInput, SamplingParams
from epd.stages.work import DecodeBatch, EncodeBatch, EncodeItem, NewDecodeSeq, PrefillBatch, PrefillItem
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
    decode_blocks = max(grid.decode_batches) * -(-(max(grid.decode_contexts) + 8) // 16)
    prefill_blocks = max(grid.prefill_batch) * -(-max(grid.prefill_lens) // 16)
    slots = max(max(grid.decode_batches), max(grid.prefill_batch))  # a hybrid LM's state slots: one a sequence
    pool = PoolConfig(kv_blocks=max(decode_blocks, prefill_blocks) + 8, mm_blocks=4096, mm_block_tokens=64, state_slots=slots)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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
                        state_slot=i,
                    )
                    for i in range(b)
                ]
                s = _median_span(lambda items=items: w.execute(PrefillBatch(items)), grid.repeats)
                rows.append({"stage": "prefill", "tokens": b * length, "square": b * length * length, "seqs": b, "seconds": s})
        for ctx in grid.decode_contexts:
            for b in grid.decode_batches:
                per = -(-(ctx + 8) // 16)
                ids = [f"d{i}" for i in range(b)]
                new = [
                    NewDecodeSeq(r, None, list(range(i * per, (i + 1) * per)), ctx, 7, SamplingParams(), state_slot=i)
                    for i, r in enumerate(ids)
                ]
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
                ray.get(ray.put(t)).clone()  # what the object-store backend does: put on send, get on pull
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


def calibrate(cfg: RunConfig, coeffs: dict, n: int = 6, tokens: int = 32) -> tuple[float, float]:
    """How the real engine differs from the isolated measurements: (slowdown, overhead).

    Requests arrive one at a time (the async path `epd.run` uses) through the configured deployment
    on Ray. `slowdown`: the workers' measured encode and prefill spans over the fitted ones (the
    workers share the machine with Ray and each other). `overhead`: the time between tokens beyond
    the slowed decode step (with async scheduling the worker's own per-step cost; one batch at a
    time also the driver round trip).
    """
    import dataclasses

    from epd.backends import EngineBackend
    from epd.experiment import make_requests
    from epd.lifetime import LifetimeEvent as Ev
    from epd.models.runtime import load_family
    from simulator.latency import DecodeShape, EncodeShape, PrefillShape, ProfiledModel
    from simulator.shapes import ModelShape

    model = ProfiledModel(coeffs)
    shape = ModelShape.of(load_family(cfg.model), cfg.model.dtype)
    e_sends = "prefill" not in POOL_ROLES[cfg.deployment.pool_for("encode")]
    p_sends = "decode" not in POOL_ROLES[cfg.deployment.pool_for("prefill")]
    workload = dataclasses.replace(
        cfg.workload,
        arrival="constant",
        rate=2.0,
        num_requests=n + 1,
        output_tokens=tokens,
        output_tokens_max=None,
        images_per_request=1,
        images_per_request_max=None,
        ignore_eos=True,
    )
    run_cfg = dataclasses.replace(cfg, workload=workload)
    result = EngineBackend(run_cfg).run(make_requests(run_cfg))
    ratios, records = [], []
    by_req = result.events.by_request()
    for rid in sorted(by_req)[1:]:  # the first request warms up
        first = {e.kind: e.time for e in reversed(by_req[rid])}
        last = {e.kind: e.time for e in by_req[rid]}
        prompt = result.outputs[rid].prompt_tokens
        # the simulator charges sends to the transfer model (half at the sender): take them out here
        if Ev.ENCODE_BEGIN in first:
            send = model.transfer(shape.tokens_per_tile * shape.mm_bytes_per_token) / 2 if e_sends else 0.0
            ratios.append((last[Ev.ENCODE_END] - first[Ev.ENCODE_BEGIN] - send) / model.encode(EncodeShape(1)))
        send = model.transfer(prompt * shape.kv_bytes_per_token) / 2 if p_sends else 0.0
        ratios.append((first[Ev.PREFILL_END] - first[Ev.PREFILL_BEGIN] - send) / model.prefill(PrefillShape((prompt,))))
        records.append(([e.time for e in by_req[rid] if e.kind == Ev.TOKEN], prompt))
    slowdown = max(1.0, statistics.median(ratios))
    gaps = [
        times[k] - times[k - 1] - slowdown * model.decode(DecodeShape(1, prompt + k))
        for times, prompt in records
        for k in range(1, len(times))
    ]
    return slowdown, max(0.0, statistics.median(gaps))


def run_profile(cfg: RunConfig, out_dir: Path, resolved: dict) -> dict:
    rows, rpc = measure(cfg)
    coeffs, errors = fit(rows)
    if cfg.profile.calibrate:
        slowdown, excess = calibrate(cfg, coeffs)
        # One batch at a time the excess holds the round trip too; the profile keeps the parts apart.
        overhead = excess if cfg.deployment.async_scheduling else max(0.0, excess - rpc)
    else:
        slowdown, overhead = 1.0, 0.0
    profile = {
        "model": cfg.model.name,
        "device": cfg.model.device,
        "dtype": cfg.model.dtype,
        "threads": torch.get_num_threads(),
        "overhead": overhead,
        "slowdown": slowdown,
        "rpc": rpc,
        "async_scheduling": cfg.deployment.async_scheduling,
        "rows": rows,
        "coefficients": coeffs,
        "fit_error": errors,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(profile, indent=2))
    print(
        f"profile of {cfg.model.name} on {cfg.model.device}: {len(rows)} measurements, "
        f"in the engine: compute x{slowdown:.2f}, per-batch overhead {overhead * 1e3:.2f} ms on the worker + {rpc * 1e3:.2f} ms "
        "round trip when scheduled one batch at a time"
    )
    for stage, err in errors.items():
        print(f"  {stage:9s} coefficients {[f'{c:.3g}' for c in coeffs[stage]]}  mean relative fit error {err * 100:.1f}%")
    print(f"  written to {out_dir / 'profile.json'}")
    return profile
