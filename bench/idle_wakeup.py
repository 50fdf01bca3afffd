"""What a GPU's first work after an idle gap costs, on one GPU:

    python bench/idle_wakeup.py --out DIR

An empty kernel, a 19 MB and a 109 MB device copy (an MM pull's sizes), each timed as the engine
times a pull (wall clock from the call to a device synchronize): back to back, and after idle gaps
of 1-100 ms spent sleeping (the host thread parks) or spinning (the host stays awake). It tells
whether slow pulls after idle come from the GPU or from the host waking up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _wait(seconds: float, spin: bool) -> None:
    if spin:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    elif seconds:
        time.sleep(seconds)


def _median_ms(fn, gap: float, spin: bool, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        _wait(gap, spin)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    small = torch.empty(19 << 20, dtype=torch.uint8, device="cuda")
    big = torch.empty(109 << 20, dtype=torch.uint8, device="cuda")
    small_dst, big_dst = torch.empty_like(small), torch.empty_like(big)
    one = torch.zeros(1, device="cuda")
    work = {
        "tiny_kernel": lambda: one.add_(1),
        "copy_19MB": lambda: small_dst.copy_(small),
        "copy_109MB": lambda: big_dst.copy_(big),
    }
    rows = []
    for gap_ms in (0, 1, 5, 20, 50, 100):
        for spin in (False, True):
            if gap_ms == 0 and spin:
                continue
            row = {"gap_ms": gap_ms, "host": "spin" if spin else "sleep"}
            for name, fn in work.items():
                row[f"{name}_ms"] = round(_median_ms(fn, gap_ms / 1e3, spin), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/idle_wakeup.py --out DIR"
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": command, "rows": rows}
    (out / "idle_wakeup.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
