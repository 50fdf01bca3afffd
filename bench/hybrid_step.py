"""A hybrid LM's steps on one GPU (MiniCPM-V 4.6's Qwen3.5 shape, dummy bf16 weights): decode at several
batch sizes against the bytes it must move, and prefill steps against the matmul ceiling, with the decode
update in torch (`EPD_TRITON_DELTA=0`) and in the Triton kernel, eager and in the worker's decode graphs;
--profile prints where the device time goes.

    python bench/hybrid_step.py --batches 1,8,32,64 --prefill 8x600,1x4096 --profile --out hybrid.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.configs import model_config  # noqa: E402
from bench.gpu_bench import ceilings  # noqa: E402
from bench.mixed_step import timed  # noqa: E402
from bench.prefill_step import profile_step  # noqa: E402
from epd.models.decode_graphs import DecodeGraphs  # noqa: E402
from epd.models.generate import lm_step  # noqa: E402
from epd.models.runtime import ModelRuntime  # noqa: E402
from simulator.shapes import ModelShape  # noqa: E402

BS = 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minicpm-v-4.6")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--prefill", default="8x600,1x4096", help="PROMPTSxLENGTH, comma-separated")
    ap.add_argument("--paths", default="torch,triton,graph-torch,graph-triton", help="decode paths, comma-separated")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = model_config(a.model)
    rt = ModelRuntime(cfg, {"lm"}, "cuda")
    fam = rt.family
    shape = ModelShape.of(fam, "bfloat16")
    ceil = ceilings()
    peak, bw = ceil["bf16_matmul_TFLOPs"] * 1e12, ceil["copy_GBps"] * 1e9
    weights = rt.weight_bytes()["lm"]
    batches = [int(b) for b in a.batches.split(",") if b]
    prefills = [tuple(int(x) for x in c.split("x")) for c in a.prefill.split(",") if c]
    seqs = max(batches + [n for n, _ in prefills])
    per_seq = -(-(max([a.context + 1] + [length for _, length in prefills])) // BS)
    kv = rt.allocate_kv_cache(seqs * per_seq + 1, BS)
    rt.lm.fuse()  # as the worker runs it
    pool = rt.allocate_state_pool(seqs + 1)  # the last slot: padded graph rows' scratch
    scratch = seqs * per_seq  # the KV block past every sequence's: padded graph rows write there
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(seqs)]
    result = {"card": torch.cuda.get_device_name(0), "model": a.model, "ceilings": ceil, "lm_weight_bytes": weights}
    result.update(decode=[], prefill=[])
    print(f"{result['card']}: {a.model}, LM {weights / 1e9:.1f} GB, state {fam.state_bytes_per_sequence() / 1e6:.1f} MB a sequence")
    for path in a.paths.split(","):
        os.environ["EPD_TRITON_DELTA"] = "1" if path.endswith("triton") else "0"
        graphs = None
        if path.startswith("graph"):  # the worker's decode graphs, captured with this update
            graphs = DecodeGraphs(rt.lm, kv, BS, scratch, per_seq, sizes=tuple(batches), state=pool)
        for b in batches:

            def step(b=b, graphs=graphs):
                if graphs is not None:
                    return graphs.run([7] * b, [a.context] * b, tables[:b], key=b, state_slots=list(range(b)))
                return lm_step(rt, kv, [[7]] * b, [a.context] * b, tables[:b], BS, states=(pool, list(range(b))))

            ms = timed(step, iters=10)
            moved = weights + b * a.context * fam.kv_bytes_per_token() + 2 * b * fam.state_bytes_per_sequence()
            floor = moved / bw * 1e3
            result["decode"].append({"path": path, "batch": b, "ms": ms, "floor_ms": floor})
            print(f"  decode {path:12s} batch {b:3d}: {ms:7.2f} ms (bytes floor {floor:.2f} ms, {floor / ms:.0%})")
            if a.profile and b == max(batches):
                print(f"  device time by kernel (decode, {path}, batch {b}):")
                result["decode"][-1]["profile"] = profile_step(step)
        graphs = None  # its memory back before the next path captures
    for n, length in prefills:

        def pre(n=n, length=length):
            toks = [[(i * 31 + j * 7) % 30000 + 10 for j in range(length)] for i in range(n)]
            return lm_step(rt, kv, toks, [0] * n, tables[:n], BS, states=(pool, list(range(n))))

        ms = timed(pre, iters=3)
        flops = n * (length * shape.lm_flops_per_token + 0.5 * length * length * shape.attn_flops_coeff)
        share = flops / (ms / 1e3) / peak
        result["prefill"].append({"prompts": n, "length": length, "ms": ms, "share_of_matmul_ceiling": share})
        print(f"  prefill {n} x {length}: {ms:.1f} ms, {share:.0%} of the matmul ceiling")
        if a.profile and (n, length) == prefills[0]:
            print(f"  device time by kernel (prefill {n} x {length}):")
            result["prefill"][-1]["profile"] = profile_step(pre)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
