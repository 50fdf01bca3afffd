"""The driver's scheduling cost per step at large batches, without a GPU: the simulator runs the engine's
own scheduling code (admission, chunked prefill, decode selection, KV growth and preemption, results),
so its wall time over the steps it simulates is what the engine's driver spends deciding them.

    python bench/driver_cost.py --requests 512 --output 256 [--profile]

The workload is `bench/gpu_bench.py --sections e2e`'s (LLaVA-1.5-7B shape, one 336 px image + 24 tokens,
256 sequences decoding at once on one H200's KV).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.config import DeploymentConfig, HardwareConfig, PoolConfig  # noqa: E402
from epd.models.runtime import load_family  # noqa: E402
from epd.request import ImageInput, Request, SamplingParams  # noqa: E402
from simulator.latency import RooflineModel  # noqa: E402
from simulator.shapes import ModelShape  # noqa: E402
from simulator.sim import Simulation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--kv-blocks", type=int, default=13000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    family = load_family(model_config("llava-1.5-7b"))
    shape = ModelShape.of(family, "bfloat16")
    pool = PoolConfig(kv_blocks=args.kv_blocks, mm_blocks=4096, max_prefill_tokens=16384, max_decode_seqs=256, max_images_per_batch=32)
    dep = DeploymentConfig(name="aggregated", aggregated=pool)
    hw = HardwareConfig(peak_flops=9.89e14, memory_bandwidth=4.8e12, compute_efficiency=0.6, memory_efficiency=0.8, memory_bytes=1.41e11)
    reqs = [
        Request(
            f"r{i}",
            prompt_token_ids=tuple((i * 7 + j) % 30000 + 10 for j in range(24)),
            images=(ImageInput(width=336, height=336, seed=i),),
            sampling=SamplingParams(max_tokens=args.output, ignore_eos=True),
        )
        for i in range(args.requests)
    ]
    sim = Simulation(dep, family, shape, RooflineModel(shape, hw))
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    result = sim.run(reqs)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    steps = len({e.time for e in result.events if e.kind.value in ("token", "first_token")})  # each step's tokens share its end
    per = wall / steps * 1e3
    print(f"{args.requests} requests x {args.output} tokens: {wall:.2f} s of driver work over {steps} steps ({per:.2f} ms per step)")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
