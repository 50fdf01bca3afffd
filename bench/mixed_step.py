"""Time one worker step of each kind on the device: a fresh prefill of T tokens, the same tokens as a
chunk after C tokens of context, and a mixed step (B decodes + that chunk), LLaVA-1.5-7B shape.

    python bench/mixed_step.py --tokens 2048 --context 1024 --decodes 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.configs import model_config  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decodes", type=int, default=32)
    a = ap.parse_args()
    rt = ModelRuntime(model_config("llava-1.5-7b"), {"lm"}, "cuda")
    rt.lm.fuse()
    bs = 16
    kv = rt.allocate_kv_cache(2048, bs)
    need = -(-(a.context + a.tokens) // bs)
    table = list(range(need))
    toks = [(i * 7) % 30000 + 10 for i in range(a.tokens)]
    dec_tables = [list(range(need + 40 * i, need + 40 * (i + 1))) for i in range(a.decodes)]
    fresh = timed(lambda: lm_step(rt, kv, [toks], [0], [table], bs))
    chunk = timed(lambda: lm_step(rt, kv, [toks], [a.context], [table], bs))
    mixed = timed(lambda: lm_step(rt, kv, [[5]] * a.decodes + [toks], [600] * a.decodes + [a.context], dec_tables + [table], bs))
    decode = timed(lambda: lm_step(rt, kv, [[5]] * a.decodes, [600] * a.decodes, dec_tables, bs))
    print(
        f"{torch.cuda.get_device_name(0)}: fresh prefill {a.tokens} tok {fresh:.1f} ms | chunk after {a.context} {chunk:.1f} ms | "
        f"mixed {a.decodes} decodes + chunk {mixed:.1f} ms | eager decode {a.decodes} {decode:.1f} ms"
    )


if __name__ == "__main__":
    main()
