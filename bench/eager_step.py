"""Where an eager (not graph-replayed) step's time goes on the device: the decode step of B sequences
and the mixed step (B decodes + a T-token chunk) with the compiled elementwise pieces, with the plain
torch ones (EPD_COMPILE=0's path), and the host-side time per op from the profiler.

    python bench/eager_step.py --decodes 32 --tokens 1024
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


def timed(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def host_time(fn, iters: int = 10) -> tuple[float, float]:
    """(ms the host spends issuing one step, ms the whole step takes): a launch-bound step issues in about its whole time."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
        torch.cuda.synchronize()
    full = (time.perf_counter() - t) / iters
    t = time.perf_counter()
    fn()
    issued = time.perf_counter() - t
    torch.cuda.synchronize()
    return issued * 1e3, full * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1024)
    a = ap.parse_args()
    rt = ModelRuntime(model_config("llava-1.5-7b"), {"lm"}, "cuda")
    rt.lm.fuse()
    bs = 16
    kv = rt.allocate_kv_cache(4096, bs)
    dec_tables = [list(range(40 * i, 40 * (i + 1))) for i in range(a.decodes)]
    chunk_table = list(range(40 * a.decodes, 40 * a.decodes + -(-(a.tokens + 600) // bs)))
    toks = [(i * 7) % 30000 + 10 for i in range(a.tokens)]

    def decode():
        return lm_step(rt, kv, [[5]] * a.decodes, [600] * a.decodes, dec_tables, bs)

    def mixed():
        return lm_step(rt, kv, [[5]] * a.decodes + [toks], [600] * a.decodes + [600], dec_tables + [chunk_table], bs)

    def chunk():
        return lm_step(rt, kv, [toks], [600], [chunk_table], bs)

    name = torch.cuda.get_device_name(0)
    for label, fn in (("decode", decode), ("chunk", chunk), ("mixed", mixed)):
        issued, full = host_time(fn)
        print(f"{name}: {label:6s} compiled pieces: {timed(fn):7.1f} ms (host issues it in {issued:.1f} ms of {full:.1f})")
    plain = {"rms_norm": fused.rms_norm_ref, "rotary": fused.rotary_ref, "silu_mul": fused.silu_mul_ref}
    saved = dict(fused._COMPILED)
    fused._COMPILED.update(plain)
    for label, fn in (("decode", decode), ("mixed", mixed)):
        print(f"{name}: {label:6s} plain torch pieces: {timed(fn):7.1f} ms")
    fused._COMPILED.clear()
    fused._COMPILED.update(saved)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            decode()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
