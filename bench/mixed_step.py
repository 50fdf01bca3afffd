"""Time one worker step of each kind on the device, LLaVA-1.5-7B shape: a fresh prefill of T tokens,
the same tokens as a chunk after C tokens of context, a mixed step (B decodes + that chunk) and an
eager decode of B sequences. `--breakdown` adds where an eager step's time goes: the host's time to
issue it against the step's whole time, the steps with the plain torch elementwise pieces instead of
the compiled ones, and the profiler's host-side top ops of the decode step.

    python bench/mixed_step.py --tokens 2048 --context 1024 --decodes 32 [--breakdown]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.configs import model_config  # noqa: E402
from epd.kernels import fused  # noqa: E402
from epd.models.generate import lm_step  # noqa: E402
from epd.models.runtime import ModelRuntime  # noqa: E402


def timed(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def issue_ms(fn) -> float:
    """The host's time to issue one step (a launch-bound step issues in about its whole time)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    issued = time.perf_counter() - t
    torch.cuda.synchronize()
    return issued * 1e3


def breakdown(name: str, steps: dict) -> None:
    for label, fn in steps.items():
        print(f"{name}: {label:6s} host issues it in {issue_ms(fn):.1f} ms of {timed(fn):.1f} ms")
    saved = dict(fused._COMPILED)
    fused._COMPILED.update(rms_norm=fused.rms_norm_ref, rotary=fused.rotary_ref, silu_mul=fused.silu_mul_ref)
    try:
        for label, fn in steps.items():
            print(f"{name}: {label:6s} with plain torch elementwise pieces {timed(fn):.1f} ms")
    finally:
        fused._COMPILED.clear()
        fused._COMPILED.update(saved)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            steps["decode"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--breakdown", action="store_true")
    a = ap.parse_args()
    rt = ModelRuntime(model_config("llava-1.5-7b"), {"lm"}, "cuda")
    rt.lm.fuse()
    bs = 16
    kv = rt.allocate_kv_cache(2048, bs)
    need = -(-(a.context + a.tokens) // bs)
    table = list(range(need))
    toks = [(i * 7) % 30000 + 10 for i in range(a.tokens)]
    dec_tables = [list(range(need + 40 * i, need + 40 * (i + 1))) for i in range(a.decodes)]
    steps = {
        "fresh": lambda: lm_step(rt, kv, [toks], [0], [table], bs),
        "chunk": lambda: lm_step(rt, kv, [toks], [a.context], [table], bs),
        "mixed": lambda: lm_step(rt, kv, [[5]] * a.decodes + [toks], [600] * a.decodes + [a.context], dec_tables + [table], bs),
        "decode": lambda: lm_step(rt, kv, [[5]] * a.decodes, [600] * a.decodes, dec_tables, bs),
    }
    ms = {label: timed(fn) for label, fn in steps.items()}
    name = torch.cuda.get_device_name(0)
    print(
        f"{name}: fresh prefill {a.tokens} tok {ms['fresh']:.1f} ms | chunk after {a.context} {ms['chunk']:.1f} ms | "
        f"mixed {a.decodes} decodes + chunk {ms['mixed']:.1f} ms | eager decode {a.decodes} {ms['decode']:.1f} ms"
    )
    if a.breakdown:
        breakdown(name, steps)


if __name__ == "__main__":
    main()
