"""Which mixed steps a warm engine still pays a first-call cost for, and what compiles then.

After the engine reports ready (its warm-up done), scenarios of D decoding sequences with a new image
request arriving meanwhile each make the aggregated worker mix the newcomer's prefill into D's decode
steps. Each scenario runs twice: the first time a kernel or graph meets a shape it has not seen, the
second time it has. Per scenario: its mixed steps' durations, and the kernels the worker compiled inside its
batches (the batch records' `compiled`: the project's Triton kernels and torch.compile's graphs). Results
recorded before this count came from the worker's Triton cache directory and dynamo's graph counter.

    python bench/mixed_first.py --decodes 1,2,3,5,16 --out mixed_first.json   # one GPU, the run's deployment
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import run_config  # noqa: E402
from epd.metrics import percentile  # noqa: E402
from epd.request import ImageInput, Request, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decodes", default="1,2,3,5,16")
    ap.add_argument("--overrides", default="+experiment=gpu4_aggregated deployment.aggregated.instances=1 hardware=h200")
    ap.add_argument("--out", default="mixed_first.json")
    args = ap.parse_args()
    from epd.config import EngineConfig
    from epd.engine.core import EngineCore

    cfg = run_config(args.overrides.split())
    t0 = time.time()
    core = EngineCore(EngineConfig(cfg.model, cfg.deployment, "ray", cfg.backend))
    print(f"ready in {time.time() - t0:.1f} s (warm-up {core.warmup_s:.1f} s); warm-up batches {core.warmup_batches}", flush=True)
    if len(core.pipeline.instances) != 1:
        raise SystemExit(f"one instance that prefills and decodes is wanted; got {list(core.pipeline.instances)}")
    vocab = min(core.pipeline.text.vocab_size, 30000)
    rows = []

    def request(name: str, prompt: int, images: int, tokens: int, seed: int) -> Request:
        ids = tuple((seed * 131 + j * 7) % (vocab - 20) + 10 for j in range(prompt))
        pics = tuple(ImageInput(width=1008, height=756, seed=seed * 10 + k) for k in range(images))
        return Request(name, prompt_token_ids=ids, images=pics, sampling=SamplingParams(max_tokens=tokens, ignore_eos=True))

    try:
        for attempt in ("first", "again"):
            for d in [int(x) for x in args.decodes.split(",")]:
                core.new_run()
                for i in range(d):
                    core.add_request(request(f"{attempt}-{d}-dec{i}", 40 + 7 * i, 1, 60, seed=100 * d + i))
                while not any(b.kind in ("DecodeBatch", "MixedBatch") for b in core.batches) and core.has_work():
                    core.step()
                for j in range(2):  # prompts of two lengths: chunks of two sizes beside the decodes
                    core.add_request(request(f"{attempt}-{d}-new{j}", 300 + 500 * j, 2, 8, seed=100 * d + 50 + j))
                core.run_until_idle(300)
                mixed = [b for b in core.batches if b.kind == "MixedBatch"]
                row = {
                    "attempt": attempt,
                    "decoding": d,
                    "mixed_steps_ms": [round((b.end - b.begin) * 1e3, 1) for b in mixed],
                    "mixed_sizes": [b.size for b in mixed],
                    "mixed_compiled": [b.compiled for b in mixed],
                    "kernels_compiled": sum(b.compiled for b in core.batches),
                    "decode_p50_ms": percentile([1e3 * (b.end - b.begin) for b in core.batches if b.kind == "DecodeBatch"], 50),
                }
                rows.append(row)
                print(row, flush=True)
    finally:
        core.close()
    Path(args.out).write_text(json.dumps({"overrides": args.overrides, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
