"""The encode stage's throughput on one GPU, from JPEG bytes to embeddings, against its ceiling.

    python bench/encode_throughput.py --out DIR [--images 64] [--batch 8] [--threads 16]

For LLaVA-1.5-7B's shape (CLIP-L/336, one tile) and InternVL2-8B's (InternViT at 448 px, up to 12
tiles and a thumbnail) by default (`--models` takes any shape, e.g. minicpm-v-2.6, qwen2-vl-7b), with
dummy bf16 weights, on photo-like 4032x3024 JPEGs:
  host     decode and resize with Pillow on `threads` threads, then the tower (the E worker's
           `model.image_resize=host` with `prep_processes=false`)
  procs    the same in `threads` processes of their own (`epd.engine.host_prep`, a GPU worker's default):
           no thread waits for another's interpreter lock
  device   decode with Pillow on the host cores, resize and tile on the GPU (`image_resize=device`;
           pixels bit-identical to the host path)
  nvjpeg   decode on the GPU too (torchvision.io.decode_jpeg on CUDA, when torchvision is there), in the
           batch, as the E worker does (the host only wraps the bytes);
           its pixels differ from libjpeg's by the IDCT's rounding: the mean difference is reported
  transformers  as a transformers user runs it: Pillow decode, the model's transformers image processor
           (CLIPImageProcessor / GotOcr2ImageProcessor, as AutoProcessor builds them) over the batch,
           then the same tower (transformers' vision modules), one step after the other
Each path but the last runs the images in batches of `batch` with the host work of batch n+1 overlapped
with the tower of batch n (as the E worker does), after a warm-up, the tower replayed from CUDA graphs as the
E worker runs it (`--tower-graphs 0`: eager); images/s is end to end. The
ceiling is the tower's FLOPs per image over the card's bf16 matrix rate measured in the same run.
`host_wait_share`: the share of the stage the GPU waited for host work (the issue's "host share").

`--split` also times the parts apart, for the simulator's encode cost model (`hardware.*_s_per_*`):
Pillow decode and resize on one host core, nvJPEG decode and resizing on the GPU, the tower per tile,
at two photo sizes; fitted per source megapixel and per tile over the models given.
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
from bench.mixed_step import timed  # noqa: E402  (wall clock per call, ms: the host parts are no GPU work)
from epd.engine.host_prep import ImageProcesses  # noqa: E402
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


def run_path(
    path: str, rt: ModelRuntime, jpegs: list[bytes], batch: int, pool: ThreadPoolExecutor, dev, procs=None, ahead: int = 2
) -> dict:
    family = rt.family

    def host_prep(data: bytes):
        im = load_image(ImageInput(data=data))
        if path == "host":
            return family.preprocess(im)
        return torch.from_numpy(np.asarray(im)).permute(2, 0, 1).contiguous().pin_memory()

    def prepare(chunk: list[bytes]):
        if path == "nvjpeg":  # the host's part: the bytes as tensors; the GPU decodes them in the batch (as the E worker does)
            return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in chunk]
        if path == "procs":
            return [f.result()[1] for f in [procs.submit(ImageInput(data=d)) for d in chunk]]
        pixels = list(pool.map(host_prep, chunk))
        if path == "device":
            return [family.preprocess(x.to(dev, non_blocking=True), TorchOps) for x in pixels]
        return pixels

    def encode(prepared) -> None:
        if path == "nvjpeg":
            import torchvision.io as tio

            prepared = [family.preprocess(x, TorchOps) for x in tio.decode_jpeg(prepared, device=dev)]
        rt.encode(prepared)

    chunks = [jpegs[i : i + batch] for i in range(0, len(jpegs), batch)]
    if path == "transformers":
        return _run_transformers(rt, chunks, dev)
    encode(prepare(chunks[0]))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    waited = 0.0  # the GPU idle, waiting for the next batch's host work
    # the host work of the next `ahead` batches while the tower runs this one, as an E worker prepares up to
    # its scheduling depth of batches beside the one on the device (one batch ahead kept a batch's images in flight)
    host = ThreadPoolExecutor(ahead)
    queued = [host.submit(prepare, c) for c in chunks[:ahead]]
    for i in range(len(chunks)):
        t = time.perf_counter()
        pixels = queued.pop(0).result()
        waited += time.perf_counter() - t
        if i + ahead < len(chunks):
            queued.append(host.submit(prepare, chunks[i + ahead]))
        encode(pixels)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    host.shutdown()
    n = len(jpegs)
    return {"path": path, "images": n, "seconds": seconds, "images_per_s": n / seconds, "host_wait_share": waited / seconds}


def _hf_processor(family):
    """The transformers image processor a LLaVA / InternVL checkpoint's AutoProcessor builds (fast variant)."""
    from transformers.models.clip import CLIPImageProcessor
    from transformers.models.got_ocr2 import GotOcr2ImageProcessor

    if family.model_type == "llava":
        side = family.hf.vision_config.image_size
        return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if family.model_type == "internvl":
        side, tiles = family.tile_size, family.cfg.max_tiles
        mean, std = family.pixel_mean, family.pixel_std
        square = {"height": side, "width": side}
        return GotOcr2ImageProcessor(size=square, crop_to_patches=True, max_patches=tiles, min_patches=1, image_mean=mean, image_std=std)
    raise ValueError(f"no transformers processor baseline for family {family.model_type!r}")


def _run_transformers(rt: ModelRuntime, chunks: list[list[bytes]], dev) -> dict:
    proc = _hf_processor(rt.family)

    def batch_pixels(chunk: list[bytes]) -> list[torch.Tensor]:
        images = [Image.open(io.BytesIO(d)).convert("RGB") for d in chunk]
        out = proc(images=images, return_tensors="pt")
        px = out["pixel_values"].to(dev, torch.bfloat16)
        counts = out["num_patches"].tolist() if "num_patches" in out else [1] * len(chunk)
        return list(torch.split(px, counts))

    rt.encode(batch_pixels(chunks[0]))  # warm-up
    torch.cuda.synchronize()
    t0, host = time.perf_counter(), 0.0
    for chunk in chunks:
        t = time.perf_counter()
        pixels = batch_pixels(chunk)
        host += time.perf_counter() - t
        rt.encode(pixels)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = sum(len(c) for c in chunks)
    return {"path": "transformers", "images": n, "seconds": seconds, "images_per_s": n / seconds, "host_wait_share": host / seconds}


def split_parts(rt: ModelRuntime, dev, batch: int) -> list[dict]:
    """Each part of encoding one photo, timed alone, at two sizes (rows: part, megapixels, tiles, seconds)."""
    import torchvision.io as tio

    family, rows = rt.family, []
    for w, h in ((4032, 3024), (1600, 1200)):
        data = photo_jpeg(w, h, 3)
        mp = w * h / 1e6
        tiles = family.num_image_tokens(w, h) / ModelShape.of(family, "bfloat16").tokens_per_tile
        im = load_image(ImageInput(data=data))
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        on_gpu = tio.decode_jpeg(raw, device=dev)
        px = family.preprocess(on_gpu, TorchOps)
        parts = {
            "host_decode": lambda data=data: load_image(ImageInput(data=data)),
            "host_resize": lambda im=im: family.preprocess(im),
            "device_decode": lambda raw=raw: tio.decode_jpeg([raw] * batch, device=dev),  # batched, per image below
            "device_resize": lambda x=on_gpu: family.preprocess(x, TorchOps),
            "tower": lambda px=px: rt.encode([px] * batch),
        }
        for part, fn in parts.items():
            per = timed(fn, 3 if part.startswith("host") else 10) / 1e3
            if part in ("device_decode", "tower"):
                per /= batch
            rows.append({"part": part, "megapixels": mp, "tiles": tiles, "seconds": per})
            print(json.dumps({"model": family.model_type, **rows[-1]}), flush=True)
    return rows


def fit_parts(rows: list[dict]) -> dict:
    """hardware.* constants: decode per megapixel; resize per megapixel and per tile (least squares)."""
    out = {}
    for part, key in (("host_decode", "decode_s_per_mpixel"), ("device_decode", "device_decode_s_per_mpixel")):
        data = [r for r in rows if r["part"] == part]
        out[key] = sum(r["seconds"] for r in data) / sum(r["megapixels"] for r in data)
    resizes = {
        "host_resize": ("preprocess_s_per_mpixel", "preprocess_s_per_tile"),
        "device_resize": ("device_resize_s_per_mpixel", "device_resize_s_per_tile"),
    }
    for part, keys in resizes.items():
        data = [r for r in rows if r["part"] == part]
        x = np.array([[r["megapixels"], r["tiles"]] for r in data])
        y = np.array([r["seconds"] for r in data])
        w = 1.0 / y  # relative error
        sol = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)[0]
        sol = np.maximum(sol, 0.0)
        out[keys[0]], out[keys[1]] = float(sol[0]), float(sol[1])
        out[f"{part}_mean_rel_err"] = float(np.mean(np.abs(x @ sol - y) / y))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--ahead", type=int, default=2, help="batches prepared beside the one encoding (the E worker: its scheduling depth)")
    ap.add_argument("--models", nargs="+", default=["llava-1.5-7b", "internvl2-8b"])
    ap.add_argument("--tower-graphs", type=int, default=1, help="1: the tower replayed from CUDA graphs, as the E worker runs it")
    ap.add_argument("--split", action="store_true", help="also time decode, resize and tower apart and fit the simulator's constants")
    args = ap.parse_args()
    dev = torch.device("cuda")
    peak = matmul_peak(dev)
    jpegs = [photo_jpeg(4032, 3024, s) for s in range(8)]
    jpegs = [jpegs[i % len(jpegs)] for i in range(args.images)]
    try:
        import torchvision.io  # noqa: F401

        paths = ["host", "procs", "device", "nvjpeg"]
    except Exception:
        paths = ["host", "procs", "device"]
    rows, parts = [], []
    with ThreadPoolExecutor(args.threads) as pool:
        for name in args.models:
            rt = ModelRuntime(model_config(name), {"vision"}, "cuda")
            tiles_cap = args.batch * rt.family.max_tiles_per_image
            graphs = rt.capture_tower_graphs(min(rt.cfg.vision_graph_tiles, tiles_cap)) if args.tower_graphs else False
            shape = ModelShape.of(rt.family, "bfloat16")
            tiles = rt.family.num_image_tokens(4032, 3024) / shape.tokens_per_tile  # tower inputs per photo, in the cost model's unit
            baseline = ["transformers"] if rt.family.model_type in ("llava", "internvl") else []
            procs = None
            for path in paths + baseline:
                if path == "procs":  # started only now, and timed once every process is up: no start-up beside the other paths
                    procs = ImageProcesses(model_config(name), args.threads)
                    procs.wait_started()
                r = run_path(path, rt, jpegs, args.batch, pool, dev, procs, args.ahead)
                if procs is not None:
                    procs.close()
                    procs = None
                r["tiles_per_image"] = tiles
                flops = shape.vision_flops_per_tile * tiles
                r.update(model=name, tower_graphs=graphs, ceiling_images_per_s=peak / flops, matmul_peak_tflops=peak / 1e12)
                r["device"] = torch.cuda.get_device_name()
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
            if args.split and "nvjpeg" in paths:
                parts += [{"model": name, **r} for r in split_parts(rt, dev, args.batch)]
            del rt
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "encode_throughput.json").write_text(json.dumps(rows, indent=1))
    if parts:
        fitted = fit_parts(parts)
        (Path(args.out) / "encode_parts.json").write_text(json.dumps({"parts": parts, "hardware": fitted}, indent=1))
        print("fitted hardware constants:", json.dumps(fitted, indent=1))
    print(f"\nbf16 matmul peak {peak / 1e12:.0f} TFLOP/s on {torch.cuda.get_device_name()}; 4032x3024 JPEGs, batch {args.batch}")
    print(f"{'model':14} {'path':12} {'img/s':>8} {'ceiling':>9} {'share':>6} {'host wait':>9}")
    for r in rows:
        if "path" in r:
            rate, ceiling, share = r["images_per_s"], r["ceiling_images_per_s"], r["share_of_ceiling"]
            print(f"{r['model']:14} {r['path']:12} {rate:>8.1f} {ceiling:>9.0f} {share:>6.1%} {r['host_wait_share']:>9.1%}")


if __name__ == "__main__":
    main()
