"""Instantiate the real-shape model configs with dummy weights on a GPU and report their sizes,
then run a few requests through the in-process engine as a smoke test.

    python bench/gpu_models.py [--models llava-1.5-7b internvl2-8b]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.config import DeploymentConfig, PoolConfig  # noqa: E402
from epd.models.runtime import ModelRuntime  # noqa: E402
from epd.request import ImageInput, Request, SamplingParams  # noqa: E402
from epd.serve.offline import OfflineLLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llava-1.5-7b", "internvl2-8b"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    card = torch.cuda.get_device_name(0)
    results = []
    for name in args.models:
        cfg = model_config(name)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        vision = ModelRuntime(cfg, {"vision"})
        vb = vision.weight_bytes()
        del vision
        lm = ModelRuntime(cfg, {"lm"})
        lb = lm.weight_bytes()
        del lm
        torch.cuda.empty_cache()
        build_s = time.time() - t0
        dep = DeploymentConfig(name="aggregated", aggregated=PoolConfig(kv_blocks=2048, mm_blocks=512, max_prefill_tokens=16384))
        reqs = [
            Request(
                f"r{i}",
                prompt_token_ids=tuple(range(100, 124)),
                images=(ImageInput(width=1024, height=768, seed=i),),
                sampling=SamplingParams(max_tokens=32, ignore_eos=True),
            )
            for i in range(4)
        ]
        with OfflineLLM(cfg, dep, executor="local") as llm:
            llm.generate(reqs[:1])
            t1 = time.time()
            outs = llm.generate(
                [Request(r.request_id + "b", r.arrival_time, r.prompt, r.prompt_token_ids, r.images, r.sampling) for r in reqs]
            )
            e2e = time.time() - t1
        row = {
            "model": name,
            "card": card,
            "vision_weight_gb": vb["vision"] / 1e9,
            "lm_weight_gb": lb["lm"] / 1e9,
            "build_s": build_s,
            "requests": len(outs),
            "tokens": sum(len(o.token_ids) for o in outs),
            "engine_e2e_s": e2e,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9,
        }
        results.append(row)
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
