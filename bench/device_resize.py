"""The device resize path against Pillow: bit-exact pixels on the GPU, and its time.

    python bench/device_resize.py --out DIR

For photo-like images (smooth gradients plus noise, JPEG-encoded once) at several sizes, runs each
family's preprocessing on the host (Pillow, as the transformers processors do) and on the device
(`TorchOps`: Pillow's bicubic reproduced in float64 matrix products), checks the uint8 pixels are
identical, and times both: the host path per image on one core, the device path per image with
CUDA events after a warm-up (median of repeats, the upload of the decoded image included).
Writes device_resize.json and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.images import load_image  # noqa: E402
from epd.models.image_processing import PILOps, TorchOps  # noqa: E402
from epd.models.runtime import load_family  # noqa: E402
from epd.request import ImageInput  # noqa: E402

SIZES = ((640, 427), (1024, 683), (2016, 1512), (4032, 3024), (3024, 4032), (1, 4000), (4000, 3))


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    px = np.clip(base + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in ("llava-1.5-7b", "internvl2-8b"):
        family = load_family(model_config(name))
        for w, h in SIZES:
            im = load_image(ImageInput(data=photo_jpeg(w, h, w + h)))
            t0 = time.perf_counter()
            host = family.preprocess(im, PILOps)
            host_s = time.perf_counter() - t0
            x = torch.from_numpy(np.asarray(im)).permute(2, 0, 1).contiguous().pin_memory() if dev.type == "cuda" else None
            x = x if x is not None else torch.from_numpy(np.asarray(im)).permute(2, 0, 1).contiguous()
            out = family.preprocess(x.to(dev, non_blocking=True), TorchOps)  # warm-up and the check
            exact = bool(torch.equal(out.cpu(), host))
            times = []
            for _ in range(args.repeats):
                if dev.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    family.preprocess(x.to(dev, non_blocking=True), TorchOps)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                else:
                    t0 = time.perf_counter()
                    family.preprocess(x, TorchOps)
                    times.append(time.perf_counter() - t0)
            row = {
                "model": name,
                "size": f"{w}x{h}",
                "tiles": int(host.shape[0]),
                "exact": exact,
                "host_pillow_s": host_s,
                "device_s": statistics.median(times),
                "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "device_resize.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'model':14} {'size':>10} {'tiles':>5} {'exact':>5} {'Pillow ms':>10} {'device ms':>10}")
    for r in rows:
        host, device = r["host_pillow_s"] * 1e3, r["device_s"] * 1e3
        print(f"{r['model']:14} {r['size']:>10} {r['tiles']:>5} {str(r['exact']):>5} {host:>10.1f} {device:>10.2f}")
    assert all(r["exact"] for r in rows), "device pixels differ from Pillow's"


if __name__ == "__main__":
    main()
