"""A prefill step as the engine runs it under load: many prompts in one forward, one of them a chunk
continued from an earlier step, optionally decodes beside them; LLaVA-1.5-7B's shape, graphed pieces.

Times the step three ways, against the card's matmul ceiling measured in the same run: `before` (compiled
elementwise pieces; attention per prompt length, or per sequence when a chunk is present), `varlen` (every
prompt and chunk in one flash varlen call) and `fused` (varlen, and the Triton q/k/v pass and SiLU-gate);
checks they give the same logits, and with --profile prints where each step's device time goes.

    python bench/prefill_step.py --prompts 27 --length 601 --vary 0.5 --chunk 256 --decodes 0 --profile --out step.json
    python bench/prefill_step.py --paths fused --cases 1x601,4x601,27x601+d256 --eager --out steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.configs import model_config  # noqa: E402
from bench.gpu_bench import ceilings  # noqa: E402
from bench.mixed_step import timed  # noqa: E402
from epd.kernels import varlen_prefill  # noqa: E402
from epd.models.generate import lm_step  # noqa: E402
from epd.models.runtime import ModelRuntime  # noqa: E402
from epd.models.step_graphs import StepGraphs  # noqa: E402
from simulator.shapes import ModelShape  # noqa: E402

PATHS = {
    "before": {"EPD_VARLEN": "0", "EPD_TRITON_ELEMENTWISE": "0"},
    "varlen": {"EPD_VARLEN": "1", "EPD_TRITON_ELEMENTWISE": "0"},
    "fused": {"EPD_VARLEN": "1", "EPD_TRITON_ELEMENTWISE": "1"},
}


def use_path(name: str) -> None:
    os.environ.update(PATHS[name])
    varlen_prefill._varlen.cache_clear()


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "cutlass", "sm90", "nvjet", "cublas", "matmul", "addmm")):
        return "gemm"
    if any(s in n for s in ("flash", "attention", "fmha", "_decode_partial", "_merge_splits")):
        return "attention"
    if "graph" in n:
        return "graph"
    return "other"


def profile_step(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    by: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total / 3
        if us <= 0:
            continue
        by[category(e.key)] = by.get(category(e.key), 0.0) + us / 1e3
        rows.append((us / 1e3, e.key[:90]))
    rows.sort(reverse=True)
    for ms, key in rows[:14]:
        print(f"    {ms:8.2f} ms  {key}")
    return {"ms_by_category": by, "top": rows[:14]}


def parse_case(text: str, a) -> dict:
    """`PROMPTSxLENGTH[+dDECODES][+cCHUNK]`, e.g. `27x601+d256+c256`; unset parts from the flags."""
    head, *mods = text.split("+")
    prompts, length = (int(x) for x in head.split("x"))
    case = {"prompts": prompts, "length": length, "decodes": a.decodes, "chunk": a.chunk}
    for m in mods:
        case[{"d": "decodes", "c": "chunk"}[m[0]]] = int(m[1:])
    return case


def run_case(rt, shape, peak: float, case: dict, a, paths: list[str]) -> dict:
    rnd = random.Random(0)
    lens = [max(1, round(case["length"] * (1 + rnd.uniform(-a.vary, a.vary)))) for _ in range(case["prompts"])]
    chunk, decodes = case["chunk"], case["decodes"]
    bs = 16
    seqs = [(n, 0) for n in lens] + ([(chunk, a.context)] if chunk else []) + [(1, 600)] * decodes
    need = [-(-(n + start) // bs) for n, start in seqs]
    kv = rt.allocate_kv_cache(sum(need) + 2, bs)
    tables, at = [], 0
    for n in need:
        tables.append(list(range(at, at + n)))
        at += n
    tokens = [[(i * 31 + j * 7) % 30000 + 10 for j in range(n)] for i, (n, _) in enumerate(seqs)]
    starts = [s for _, s in seqs]
    total = sum(n for n, _ in seqs)
    graphs = None

    def step():
        return lm_step(rt, kv, tokens, starts, tables, bs, graphs=graphs)

    flops = sum(n * shape.lm_flops_per_token + (start * n + 0.5 * n * n) * shape.attn_flops_coeff for n, start in seqs)
    result = {"lengths": lens, "chunk": chunk, "decodes": decodes, "tokens": total, "flops": flops, "graphed": not a.eager}
    logits = {}
    for path in paths:
        use_path(path)
        if path != "before" and not varlen_prefill.varlen_available():
            print("torch.nn.attention.varlen is not available in this torch")
            break
        graphs = None
        torch.cuda.empty_cache()
        if not a.eager:  # the one bucket this step uses, this path's kernels
            graphs = StepGraphs(rt.lm, kv, bs, sum(need) + 1, (max(8, total),))
        t = timed(step, iters=a.iters) / 1e3  # seconds
        logits[path] = step().float()
        result[path] = {"ms": t * 1e3, "TFLOPs": flops / t / 1e12, "share_of_matmul_ceiling": flops / t / peak}
        print(
            f"{len(lens)} prompts ({min(lens)}-{max(lens)} tokens)"
            f"{f' + a {chunk}-token chunk after {a.context}' if chunk else ''}{f' + {decodes} decodes' if decodes else ''}"
            f" = {total} tokens, {path}{'' if graphs else ' eager'}: {t * 1e3:.1f} ms, {flops / t / 1e12:.0f} TFLOP/s"
            f" = {flops / t / peak:.0%} of the matmul ceiling"
        )
        if a.profile:
            print(f"  device time by kernel ({path}):")
            prof = profile_step(step)
            result[path]["profile"] = prof
            print(f"  by category: { {k: round(v, 1) for k, v in prof['ms_by_category'].items()} }")
    first = next(iter(logits), None)
    for path in list(logits)[1:]:
        diff = (logits[path] - logits[first]).abs().max().item()
        same = (logits[path].argmax(-1) == logits[first].argmax(-1)).float().mean().item()
        result[path].update(logits_max_abs_diff=diff, argmax_equal=same)
        print(f"  {path} vs {first}: logits max |diff| {diff:.3g}, argmax equal {same:.0%}")
    return result  # the cache and graphs go with this frame


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=27)
    ap.add_argument("--length", type=int, default=601)
    ap.add_argument("--vary", type=float, default=0.0, help="prompt lengths drawn from length x [1 - vary, 1 + vary]")
    ap.add_argument("--chunk", type=int, default=0, help="one more sequence: this many tokens after --context of earlier KV")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decodes", type=int, default=0)
    ap.add_argument("--cases", default="", help="several steps in one process: comma-separated PROMPTSxLENGTH[+dDECODES][+cCHUNK]")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"of {', '.join(PATHS)}")
    ap.add_argument("--eager", action="store_true", help="no step graphs (as the engine runs steps above model.step_graph_tokens)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    paths = [p for p in a.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        ap.error(f"--paths: unknown {unknown}; known: {list(PATHS)}")
    cases = [parse_case(c, a) for c in a.cases.split(",") if c] or [
        {"prompts": a.prompts, "length": a.length, "decodes": a.decodes, "chunk": a.chunk}
    ]
    cfg = model_config("llava-1.5-7b")
    rt = ModelRuntime(cfg, {"lm"}, "cuda")
    rt.lm.fuse()
    shape = ModelShape.of(rt.family, "bfloat16")
    peak = ceilings()["bf16_matmul_TFLOPs"] * 1e12  # the benchmarks' one ceiling, measured in this run
    result = {"card": torch.cuda.get_device_name(0), "bf16_matmul_TFLOPs": peak / 1e12, "cases": []}
    print(f"{result['card']}: matmul ceiling {peak / 1e12:.0f} TFLOP/s")
    for case in cases:
        result["cases"].append(run_case(rt, shape, peak, case, a, paths))
        if a.out:
            Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
