"""The E worker's encode batch as the offline end-to-end benchmark runs it (LLaVA-1.5-7B's shape, 32
procedural 336-px images a batch), against the tower alone on the same pixels: where a batch's time goes.

    python bench/encode_batch.py --images 32 --batches 6 --profile --out encode_batch.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.configs import model_config  # noqa: E402
from bench.mixed_step import timed  # noqa: E402
from bench.prefill_step import profile_step  # noqa: E402
from epd.config import PoolConfig  # noqa: E402
from epd.engine.worker import Worker  # noqa: E402
from epd.images import load_image  # noqa: E402
from epd.request import ImageInput  # noqa: E402
from epd.stages.work import EncodeBatch, EncodeItem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llava-1.5-7b")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--sizes", default="", help="then batches of these sizes, each twice (a new size's first batch: any per-shape set-up)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--overlap", action="store_true", help="each batch's images prepared while the batch before runs, as the engine does")
    ap.add_argument("--tower-sizes", default="", help="the tower alone at these batch sizes: eager, and from CUDA graphs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = model_config(a.model)
    pool = PoolConfig(mm_blocks=4096, mm_block_tokens=64, num_cpus=8, max_images_per_batch=a.images)
    w = Worker("e", ("encode",), cfg, pool, "local", threads=8, prefetch=a.overlap)
    fam = w.rt.family
    n_tok = fam.num_image_tokens(336, 336)
    per = -(-n_tok // pool.mm_block_tokens)

    def batch(k: int, size: int = a.images) -> EncodeBatch:
        images = [ImageInput(width=336, height=336, seed=k * 1000 + i) for i in range(size)]
        items = [EncodeItem(f"b{k}-{i}", 0, im, n_tok, list(range(i * per, (i + 1) * per)), False) for i, im in enumerate(images)]
        return EncodeBatch(items)

    spans, waits, walls = [], [], []
    batches = [batch(k) for k in range(a.batches)]
    if a.overlap:
        w.prepare(batches[0])
    for k in range(a.batches):
        if a.overlap and k + 1 < a.batches:
            w.prepare(batches[k + 1])  # the next batch's images on the prep threads while this one runs
        t0 = time.perf_counter()
        res = w.execute(batches[k])
        walls.append(time.perf_counter() - t0)
        spans.append(res.span[1] - res.span[0])
        waits.append(res.host_wait)
    pixels = [fam.preprocess(load_image(ImageInput(width=336, height=336, seed=i))) for i in range(a.images)]
    tower = timed(lambda: w.rt.encode(pixels), iters=10)
    row = {
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "model": a.model,
        "images_per_batch": a.images,
        "overlap": a.overlap,
        "batch_span_ms": [s * 1e3 for s in spans],
        "host_wait_ms": [s * 1e3 for s in waits],
        "execute_wall_ms": [s * 1e3 for s in walls],
        "tower_alone_ms": tower,
    }
    print(
        f"{row['card']}: {a.images} images a batch; worker batch spans (ms) {[round(s * 1e3, 1) for s in spans]}, "
        f"host wait {[round(s * 1e3, 1) for s in waits]}; the tower alone on the same pixels {tower:.1f} ms; "
        f"median span after the first {statistics.median(spans[1:]) * 1e3:.1f} ms"
    )
    sized = []
    for j, size in enumerate(int(x) for x in a.sizes.split(",") if x):
        for rep in range(2):
            res = w.execute(batch(100 + 2 * j + rep, size))
            sized.append({"images": size, "repeat": rep, "span_ms": (res.span[1] - res.span[0]) * 1e3, "host_wait_ms": res.host_wait * 1e3})
    if sized:
        row["by_size"] = sized
        print("  by batch size (first, second):", [(r["images"], round(r["span_ms"], 1)) for r in sized])
    if a.profile:
        k = [a.batches]

        def one():
            k[0] += 1
            b = batch(k[0])
            if a.overlap:
                w.prepare(b)
            return w.execute(b)

        print("  device time by kernel (one worker batch):")
        row["profile"] = profile_step(one)
    if a.tower_sizes:
        row["tower_variants"] = tower_variants(w, [int(x) for x in a.tower_sizes.split(",")], a.profile)
    if a.out:
        Path(a.out).write_text(json.dumps(row, indent=1))


def tower_variants(w: Worker, sizes: list[int], profile: bool) -> dict:
    """The tower alone by batch size, eager and replayed from the worker's CUDA graphs (`TowerGraphs`):
    what the graphs save in launches, and what capturing them costs."""
    fam, rt = w.rt.family, w.rt
    pixels = [fam.preprocess(load_image(ImageInput(width=336, height=336, seed=i))) for i in range(max(sizes))]
    rt.tower_graphs = None
    out: dict = {"eager_ms": {}, "graphs_ms": {}}
    for n in sizes:
        out["eager_ms"][n] = timed(lambda n=n: rt.encode(pixels[:n]), iters=10)
    if profile:
        print("  eager tower, device time by kernel:")
        out["eager_profile"] = profile_step(lambda: rt.encode(pixels[: max(sizes)]))
    ref = rt.encode(pixels)
    t0 = time.perf_counter()
    rt.capture_tower_graphs(max(sizes))
    torch.cuda.synchronize()
    out["capture_s"] = time.perf_counter() - t0
    out["graphs_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(ref, rt.encode(pixels)))
    for n in sizes:
        out["graphs_ms"][n] = timed(lambda n=n: rt.encode(pixels[:n]), iters=10)
    print(
        f"  tower by size (ms) eager {out['eager_ms']}, graphs {out['graphs_ms']}; capture {out['capture_s']:.1f} s,"
        f" max |diff| {out['graphs_max_abs_diff']:.3g}"
    )
    return out


if __name__ == "__main__":
    main()
