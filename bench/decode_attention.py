"""The paged decode kernel's launch configurations against the card's read ceiling.

A decode step at a large batch is mostly this kernel reading every running sequence's KV (256 sequences of
~650 tokens: 89 GB a step for LLaVA-1.5-7B, ~20 ms on an H200). For each (batch, context, heads) case the
script times every configuration (tokens a loop iteration, warps, pipeline stages), checks it against the
default's output, and reports the KV bytes read per second against two ceilings measured in the same run:
a device copy (read + write) and a read-only reduction (`torch.sum`).

    python bench/decode_attention.py --cases 1x650,8x650,64x650,256x650,256x2048,64x4096 --out decode_attention.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.gpu_bench import ceilings, timed  # noqa: E402
from epd.kernels.triton_decode import paged_decode  # noqa: E402

HEADS = {"mha32": (32, 32), "gqa28x4": (28, 4)}  # LLaVA-1.5-7B / Qwen2-VL-7B
BLOCK_SIZE, HEAD_DIM = 16, 128
DEFAULT = (64, 2, 4)  # paged_decode's defaults: each case's other rows are compared with it


def read_ceilings() -> dict:
    """The card's copy rate and matmul rate (`gpu_bench.ceilings`) and its read-only rate (a reduction over 1 GiB)."""
    x = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)
    read = timed(lambda: x.sum(dtype=torch.float32), iters=20)
    return {**ceilings(), "read_GBps": x.numel() * 2 / read / 1e9}


def case(batch: int, ctx: int, heads: str, configs: list[tuple[int, int, int]], read_bw: float) -> dict:
    h, kvh = HEADS[heads]
    per_seq = -(-(ctx + 1) // BLOCK_SIZE)
    g = torch.Generator(device="cuda").manual_seed(batch * 7 + ctx)
    blocks = batch * per_seq + 1
    k = torch.randn(blocks, BLOCK_SIZE, kvh, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    order = torch.randperm(batch * per_seq, device="cuda", generator=g).to(torch.int32)  # blocks scattered as in a used pool
    tables = order.reshape(batch, per_seq)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, h, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = HEAD_DIM**-0.5
    ref = paged_decode(q, k, v, tables, lens, scale)
    nbytes = 2 * batch * ctx * kvh * HEAD_DIM * 2
    rows = []
    for block_n, warps, stages in configs:
        launch = {"block_n": block_n, "num_warps": warps, "num_stages": stages}
        try:
            out = paged_decode(q, k, v, tables, lens, scale, **launch)
            err = float((out.float() - ref.float()).abs().max())
            t = timed(lambda launch=launch: paged_decode(q, k, v, tables, lens, scale, **launch), iters=20)
        except Exception as e:  # a configuration the compiler refuses (registers, shared memory)
            rows.append({"block_n": block_n, "warps": warps, "stages": stages, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        rows.append(
            {
                "block_n": block_n,
                "warps": warps,
                "stages": stages,
                "ms": t * 1e3,
                "GBps": nbytes / t / 1e9,
                "share_of_read": nbytes / t / 1e9 / read_bw,
                "max_abs_diff": err,
            }
        )
    ok = [r for r in rows if "ms" in r]
    best = min(ok, key=lambda r: r["ms"])
    default = next(r for r in ok if (r["block_n"], r["warps"], r["stages"]) == DEFAULT)
    print(
        f"B={batch:4d} ctx={ctx:5d} {heads:8s}: default {default['ms']:.3f} ms ({default['share_of_read']:.0%} of read), "
        f"best BLOCK_N={best['block_n']} warps={best['warps']} stages={best['stages']} {best['ms']:.3f} ms ({best['share_of_read']:.0%})"
    )
    torch.cuda.empty_cache()
    return {"batch": batch, "context": ctx, "heads": heads, "kv_GB": nbytes / 1e9, "rows": rows, "best": best, "default": default}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="1x650,8x650,64x650,256x650,256x2048,64x4096")
    ap.add_argument("--heads", default="mha32,gqa28x4")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--stages", default="1,2,3,4")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    ceil = read_ceilings()
    print(f"read-only reduction {ceil['read_GBps']:.0f} GB/s")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    configs = list(itertools.product(ints(args.block_n), ints(args.warps), ints(args.stages)))
    if DEFAULT not in configs:
        configs.append(DEFAULT)
    results = []
    for heads in args.heads.split(","):
        for c in args.cases.split(","):
            b, ctx = (int(x) for x in c.split("x"))
            results.append(case(b, ctx, heads, configs, ceil["read_GBps"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"ceilings": ceil, "cases": results}, indent=1))


if __name__ == "__main__":
    main()
