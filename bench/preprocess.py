"""Host cost of preparing images for the vision tower, for the simulator's hardware config:

    python bench/preprocess.py --out DIR [--threads 8]

Times `load_image` (decoding) and the family's `preprocess` (resizing, tiling) — what an E worker
does on its CPU cores before the GPU sees an image — for LLaVA-1.5 (one 336 px tile) and InternVL2
(up to 12 tiles of 448 px + a thumbnail) at three source sizes, one image per core; fits decoding
per megapixel and resizing = a * megapixels + b * tiles. Prints the `hardware.decode_s_per_mpixel`,
`preprocess_s_per_mpixel` and `preprocess_s_per_tile` overrides. With --threads
it also times a batch of that many images prepared at once, as the worker's thread pool does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.images import load_image  # noqa: E402
from epd.models.runtime import load_family  # noqa: E402
from epd.request import ImageInput  # noqa: E402

SIZES = ((4032, 3024), (2016, 1512), (1008, 756))


def _decode_and_resize(family, image: ImageInput) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    im = load_image(image)
    t1 = time.perf_counter()
    tiles = int(family.preprocess(im).shape[0])
    return t1 - t0, time.perf_counter() - t1, tiles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in ("llava-1.5-7b", "internvl2-8b"):
        family = load_family(model_config(name))
        for w, h in SIZES:
            images = [ImageInput(width=w, height=h, seed=s) for s in range(max(args.repeats, args.threads))]
            _decode_and_resize(family, images[0])  # warm up
            timed = [_decode_and_resize(family, im) for im in images[: args.repeats]]
            decode, resize, tiles = statistics.median(t[0] for t in timed), statistics.median(t[1] for t in timed), timed[0][2]
            with ThreadPoolExecutor(args.threads) as pool:
                t0 = time.perf_counter()
                list(pool.map(_decode_and_resize, [family] * args.threads, images[: args.threads]))
                batch = time.perf_counter() - t0
            row = {"model": name, "width": w, "height": h, "mpixels": w * h / 1e6, "tiles": tiles, "decode_s": decode, "resize_s": resize}
            row[f"batch_of_{args.threads}_seconds"] = batch
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    a, b = np.linalg.lstsq(np.array([[r["mpixels"], r["tiles"]] for r in rows]), np.array([r["resize_s"] for r in rows]), rcond=None)[0]
    d = sum(r["decode_s"] for r in rows) / sum(r["mpixels"] for r in rows)
    fit = {"decode_s_per_mpixel": d, "preprocess_s_per_mpixel": float(a), "preprocess_s_per_tile": float(b)}
    print(" ".join(f"hardware.{k}={v:.4g}" for k, v in fit.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    command = "python bench/preprocess.py " + " ".join(sys.argv[1:])
    result = {"cpu": cpu, "cores": os.cpu_count(), "command": command, "rows": rows, "fit": fit}
    (out / "preprocess.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
