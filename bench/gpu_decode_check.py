"""The engine with `model.image_decode=device` on one GPU: JPEG requests decoded by nvJPEG in the E
worker, against the same requests decoded on the host (both resized on the GPU).

    python bench/gpu_decode_check.py --out DIR

LLaVA-1.5-7B's shape (dummy bf16 weights), EPD in one process, 16 requests of two 4032x3024 JPEGs.
Reports the encode stage's service time per batch for each, whether the GPU decoder ran, and how many
requests' greedy tokens agree (nvJPEG's pixels differ from libjpeg's by a fraction of a level, so a
random model may part ways after some tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from bench.encode_throughput import photo_jpeg  # noqa: E402
from epd.config import DeploymentConfig, EngineConfig, PoolConfig  # noqa: E402
from epd.lifetime import LifetimeEvent as Ev  # noqa: E402
from epd.request import ImageInput, Request, SamplingParams  # noqa: E402
from epd.serve.offline import OfflineLLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    jpegs = [photo_jpeg(4032, 3024, s) for s in range(8)]
    reqs = []
    for i in range(16):
        images = (ImageInput(data=jpegs[i % 8]), ImageInput(data=jpegs[(i + 3) % 8]))
        reqs.append(
            Request(
                f"r{i}", prompt_token_ids=tuple(range(100, 116)), images=images, sampling=SamplingParams(max_tokens=16, ignore_eos=True)
            )
        )
    base = dataclasses.replace(model_config("llava-1.5-7b"), image_resize="device")
    pool = PoolConfig(kv_blocks=512, mm_blocks=256, max_images_per_batch=8, num_gpus=0)
    dep = DeploymentConfig(encode=pool, prefill=pool, decode=pool)
    out = {}
    for decode in ("host", "device"):
        with OfflineLLM(EngineConfig(dataclasses.replace(base, image_decode=decode), dep, "local")) as llm:
            llm.generate(reqs[:2])  # warm-up
            used = llm.core.executor.workers["encode-0"]._jpeg is not None
            outs = llm.generate(reqs)
            spans = {}
            for e in llm.core.pipeline.events:
                if e.kind in (Ev.ENCODE_BEGIN, Ev.ENCODE_END):
                    spans.setdefault((e.request_id, e.data.get("image")), []).append(e.time)
            service = [b - a for a, b in (sorted(v)[:2] for v in spans.values() if len(v) == 2)]
        out[decode] = {
            "gpu_decoder": used,
            "encode_batch_s_p50": statistics.median(service),
            "tokens": {o.request_id: o.token_ids for o in outs},
        }
    same = sum(out["host"]["tokens"][r] == out["device"]["tokens"][r] for r in out["host"]["tokens"])
    summary = {d: {k: v for k, v in out[d].items() if k != "tokens"} for d in out} | {"requests_with_identical_tokens": f"{same}/16"}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_decode_check.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
