"""How many of the host's cores the encode stage's host work can use: 1, 2, 4, ... processes each decode and
prepare the same 12 MP JPEG photo (LLaVA's preprocessing) for a fixed time; images/s against one process's.
A CPU quota (cgroup `cpu.max`) or shared cores show as scaling that stops below `nproc`.

    python bench/host_cores.py --out host_cores.json [--procs 1,2,4,8,16] [--seconds 4]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu_max() -> str:
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def _work(model, data: bytes, seconds: float, barrier, results) -> None:
    """Images prepared for `seconds` once every process is warm (the barrier): all measure the same window."""
    import torch

    from epd.engine.host_prep import prepare_image
    from epd.models.runtime import load_family
    from epd.request import ImageInput

    torch.set_num_threads(1)
    family = load_family(model)
    image = ImageInput(data=data)
    prepare_image(image, family, False)  # first call's imports and set-up outside the window
    barrier.wait()
    stop, done = time.time() + seconds, 0
    while time.time() < stop:
        prepare_image(image, family, False)
        done += 1
    results.put(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--procs", default="1,2,4,8,16")
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    from bench.configs import model_config
    from epd.images import photo_like

    model = model_config("llava-1.5-7b")

    buf = io.BytesIO()
    photo_like(4032, 3024, 0).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for n in [int(x) for x in args.procs.split(",")]:
        barrier, results = ctx.Barrier(n + 1), ctx.Queue()
        procs = [ctx.Process(target=_work, args=(model, data, args.seconds, barrier, results)) for _ in range(n)]
        for p in procs:
            p.start()
        barrier.wait(timeout=300)
        rate = sum(results.get(timeout=300) for _ in procs) / args.seconds
        for p in procs:
            p.join()
        rows.append({"processes": n, "images_per_s": rate})
    one = rows[0]["images_per_s"] / rows[0]["processes"]
    for r in rows:
        r["cores_worth"] = r["images_per_s"] / one
        print(f"{r['processes']:3d} processes: {r['images_per_s']:6.1f} img/s = {r['cores_worth']:5.2f} x one process")
    result = {"nproc": os.cpu_count(), "cpu_max": _cpu_max(), "jpeg_bytes": len(data), "rows": rows}
    print(f"nproc {result['nproc']}, cgroup cpu.max {result['cpu_max']}, one 4032x3024 JPEG of {len(data)} bytes")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
