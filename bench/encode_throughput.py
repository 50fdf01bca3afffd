"""The encode stage's throughput on one GPU, from JPEG bytes to embeddings, against its ceiling.

    python bench/encode_throughput.py --out DIR [--images 64] [--batch 8] [--threads 16]

For LLaVA-1.5-7B's shape (CLIP-L/336, one tile) and InternVL2-8B's (InternViT at 448 px, up to 12
tiles and a thumbnail) by default (`--models` takes any shape, e.g. minicpm-v-2.6, qwen2-vl-7b), with
dummy bf16 weights, on photo-like 4032x3024 JPEGs:
  host     decode and resize with Pillow on `threads` host cores, then the tower (the E worker's
           `model.image_resize=host`)
  device   decode with Pillow on the host cores, resize and tile on the GPU (`image_resize=device`;
           pixels bit-identical to the host path)
  nvjpeg   decode on the GPU too (torchvision.io.decode_jpeg on CUDA, when torchvision is there);
           its pixels differ from libjpeg's by the IDCT's rounding: the mean difference is reported
Each path runs the images in batches of `batch` with the host work of batch n+1 overlapped with the
tower of batch n (as a pipelined E worker would), after a warm-up; images/s is end to end. The
ceiling is the tower's FLOPs per image over the card's bf16 matrix rate measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.configs import model_config  # noqa: E402
from epd.images import load_image  # noqa: E402
from epd.models.image_processing import TorchOps  # noqa: E402
from epd.models.runtime import ModelRuntime  # noqa: E402
from epd.request import ImageInput  # noqa: E402
from simulator.shapes import ModelShape  # noqa: E402


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), ((xx // 7 + yy // 5) * 3) % 256], -1)
    px = np.clip(base + rng.integers(-25, 26, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def matmul_peak(dev) -> float:
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0)


def run_path(path: str, rt: ModelRuntime, jpegs: list[bytes], batch: int, pool: ThreadPoolExecutor, dev) -> dict:
    family = rt.family

    def host_prep(data: bytes):
        im = load_image(ImageInput(data=data))
        if path == "host":
            return family.preprocess(im)
        return torch.from_numpy(np.asarray(im)).permute(2, 0, 1).contiguous().pin_memory()

    def prepare(chunk: list[bytes]) -> list[torch.Tensor]:
        if path == "nvjpeg":
            import torchvision.io as tio

            raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in chunk]
            return [family.preprocess(x, TorchOps) for x in tio.decode_jpeg(raw, device=dev)]
        pixels = list(pool.map(host_prep, chunk))
        if path == "device":
            return [family.preprocess(x.to(dev, non_blocking=True), TorchOps) for x in pixels]
        return pixels

    chunks = [jpegs[i : i + batch] for i in range(0, len(jpegs), batch)]
    rt.encode(prepare(chunks[0]))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    host = ThreadPoolExecutor(1)  # host work of the next batch while the tower runs this one
    nxt = host.submit(prepare, chunks[0])
    for i in range(len(chunks)):
        pixels = nxt.result()
        if i + 1 < len(chunks):
            nxt = host.submit(prepare, chunks[i + 1])
        rt.encode(pixels)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    host.shutdown()
    return {"path": path, "images": len(jpegs), "seconds": seconds, "images_per_s": len(jpegs) / seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=["llava-1.5-7b", "internvl2-8b"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    peak = matmul_peak(dev)
    jpegs = [photo_jpeg(4032, 3024, s) for s in range(8)]
    jpegs = [jpegs[i % len(jpegs)] for i in range(args.images)]
    try:
        import torchvision.io  # noqa: F401

        paths = ["host", "device", "nvjpeg"]
    except Exception:
        paths = ["host", "device"]
    rows = []
    with ThreadPoolExecutor(args.threads) as pool:
        for name in args.models:
            rt = ModelRuntime(model_config(name), {"vision"}, "cuda")
            shape = ModelShape.of(rt.family, "bfloat16")
            tiles = rt.family.num_image_tokens(4032, 3024) / shape.tokens_per_tile  # tower inputs per photo, in the cost model's unit
            for path in paths:
                r = run_path(path, rt, jpegs, args.batch, pool, dev)
                r["tiles_per_image"] = tiles
                flops = shape.vision_flops_per_tile * tiles
                r.update(model=name, ceiling_images_per_s=peak / flops, matmul_peak_tflops=peak / 1e12, device=torch.cuda.get_device_name())
                r["share_of_ceiling"] = r["images_per_s"] / r["ceiling_images_per_s"]
                rows.append(r)
                print(json.dumps(r), flush=True)
            if "nvjpeg" in paths:  # how far nvJPEG's pixels are from libjpeg's (the host and device paths')
                import torchvision.io as tio

                a = rt.family.preprocess(load_image(ImageInput(data=jpegs[0])))
                b = rt.family.preprocess(tio.decode_jpeg(torch.frombuffer(bytearray(jpegs[0]), dtype=torch.uint8), device=dev), TorchOps)
                flat = lambda p: torch.cat([x.flatten() for x in p]) if isinstance(p, list) else p.flatten()  # noqa: E731
                diff = (flat(a).int() - flat(b).cpu().int()).abs().float()
                rows.append({"model": name, "nvjpeg_vs_libjpeg_mean_abs_levels": diff.mean().item(), "max": diff.max().item()})
                print(json.dumps(rows[-1]), flush=True)
            del rt
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "encode_throughput.json").write_text(json.dumps(rows, indent=1))
    print(f"\nbf16 matmul peak {peak / 1e12:.0f} TFLOP/s on {torch.cuda.get_device_name()}; 4032x3024 JPEGs, batch {args.batch}")
    print(f"{'model':14} {'path':7} {'img/s':>8} {'ceiling':>9} {'share':>6}")
    for r in rows:
        if "path" in r:
            rate, ceiling, share = r["images_per_s"], r["ceiling_images_per_s"], r["share_of_ceiling"]
            print(f"{r['model']:14} {r['path']:7} {rate:>8.1f} {ceiling:>9.0f} {share:>6.1%}")


if __name__ == "__main__":
    main()
