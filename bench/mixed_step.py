"""Time one worker step of each kind on the device, LLaVA-1.5-7B shape: a fresh prefill of T tokens,
the same tokens as a chunk after C tokens of context, a mixed step (B decodes + that chunk) and an
eager decode of B sequences. `--graphs` runs them through piecewise step graphs too (their logits
checked against the eager step's). `--breakdown` adds where an eager step's time goes: the host's time to
issue it against the step's whole time, the steps with the plain torch elementwise pieces instead of
the compiled ones, and the profiler's top ops (host and device time) of the decode and mixed steps.

    python bench/mixed_step.py --tokens 2048 --context 1024 --decodes 32 [--graphs] [--breakdown]
"""

from __future__ import annotations

import argparse
import os
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
    os.environ["EPD_COMPILE"] = "0"  # read at every call: the plain definitions, neither Triton nor compiled
    try:
        for label, fn in steps.items():
            print(f"{name}: {label:6s} with plain torch elementwise pieces {timed(fn):.1f} ms")
    finally:
        del os.environ["EPD_COMPILE"]
    from torch.profiler import ProfilerActivity, profile

    for label in ("decode", "mixed"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                steps[label]()
            torch.cuda.synchronize()
        for key in ("self_cpu_time_total", "self_device_time_total"):
            print(f"--- {label}, 3 steps, by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=60))


def graphed(rt: ModelRuntime, kv: torch.Tensor, bs: int, make_steps, name: str) -> None:
    """The same steps through piecewise step graphs: capture time, step times, logits against eager."""
    from epd.models.step_graphs import StepGraphs, bucket_sizes

    t = time.perf_counter()
    graphs = StepGraphs(rt.lm, kv, bs, kv.shape[2] - 1, bucket_sizes(4096))
    torch.cuda.synchronize()
    print(f"{name}: step graphs for {len(graphs.sizes)} buckets captured in {time.perf_counter() - t:.1f} s")
    for (label, eager), fn in zip(make_steps(None).items(), make_steps(graphs).values()):
        want, got = eager(), fn()
        diff = (got.float() - want.float()).abs().max().item()
        same = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        print(
            f"{name}: {label:6s} graphed {timed(fn):.1f} ms (host issues it in {issue_ms(fn):.1f} ms); "
            f"logits vs eager max |diff| {diff:.3g}, argmax equal {same:.0%}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decodes", type=int, default=32)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="also through piecewise step graphs, checked against eager")
    a = ap.parse_args()
    rt = ModelRuntime(model_config("llava-1.5-7b"), {"lm"}, "cuda")
    rt.lm.fuse()
    bs = 16
    kv = rt.allocate_kv_cache(2048, bs)
    need = -(-(a.context + a.tokens) // bs)
    table = list(range(need))
    toks = [(i * 7) % 30000 + 10 for i in range(a.tokens)]
    dec_tables = [list(range(need + 40 * i, need + 40 * (i + 1))) for i in range(a.decodes)]

    def make_steps(graphs):
        mixed_starts = [600] * a.decodes + [a.context]
        return {
            "fresh": lambda: lm_step(rt, kv, [toks], [0], [table], bs, graphs=graphs),
            "chunk": lambda: lm_step(rt, kv, [toks], [a.context], [table], bs, graphs=graphs),
            "mixed": lambda: lm_step(rt, kv, [[5]] * a.decodes + [toks], mixed_starts, dec_tables + [table], bs, graphs=graphs),
            "decode": lambda: lm_step(rt, kv, [[5]] * a.decodes, [600] * a.decodes, dec_tables, bs, graphs=graphs),
        }

    steps = make_steps(None)
    ms = {label: timed(fn) for label, fn in steps.items()}
    name = torch.cuda.get_device_name(0)
    print(
        f"{name}: fresh prefill {a.tokens} tok {ms['fresh']:.1f} ms | chunk after {a.context} {ms['chunk']:.1f} ms | "
        f"mixed {a.decodes} decodes + chunk {ms['mixed']:.1f} ms | eager decode {a.decodes} {ms['decode']:.1f} ms"
    )
    if a.graphs:
        graphed(rt, kv, bs, make_steps, name)
    if a.breakdown:
        breakdown(name, steps)


if __name__ == "__main__":
    main()
