"""The LM's GEMMs at the token counts the engine runs, against the square-GEMM ceiling of the same run.

A prefill or mixed step is mostly four GEMMs a layer (q/k/v, o, gate/up, down). This prints what cuBLAS
gives for each at a step's token count, and for the count rounded up to a multiple of 64/128/256 (does
padding the step pay?), so the step's share of the ceiling can be split into the GEMMs' own and the rest.

    python bench/gemm_shapes.py --tokens 256,601,4808,16483 --out gemm_shapes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.gpu_bench import ceilings, timed  # noqa: E402

LINEARS = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}  # LLaVA-1.5-7B (in, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="256,601,4808,16483")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    peak = ceilings()["bf16_matmul_TFLOPs"] * 1e12  # the square 8192 GEMM, as every GPU benchmark here measures it
    weights = {name: torch.randn(o, i, device="cuda", dtype=torch.bfloat16) for name, (i, o) in LINEARS.items()}
    rows = []
    for m in (int(x) for x in args.tokens.split(",")):
        for pad in (1, 64, 128, 256):
            mp = -(-m // pad) * pad
            if pad > 1 and mp == m:
                continue
            total_t, total_f = 0.0, 0.0
            parts = {}
            for name, w in weights.items():
                x = torch.randn(mp, w.shape[1], device="cuda", dtype=torch.bfloat16)
                t = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w), iters=20)
                f = 2 * m * w.shape[0] * w.shape[1]  # useful FLOPs: the real tokens only
                parts[name] = {"ms": t * 1e3, "share": f / t / peak}
                total_t += t
                total_f += f
            share = total_f / total_t / peak
            row = {"tokens": m, "padded_to": mp, "layer_gemms_ms": total_t * 1e3, "share_of_ceiling": share, "parts": parts}
            rows.append(row)
            detail = " ".join(f"{k} {v['share']:.0%}" for k, v in parts.items())
            print(f"M={m:6d} as {mp:6d}: a layer's GEMMs {total_t * 1e3:.2f} ms = {row['share_of_ceiling']:.0%} of the ceiling ({detail})")
    if args.out:
        Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(0), "square_TFLOPs": peak / 1e12, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
