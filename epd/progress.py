"""A progress bar on a terminal (done, rate, ETA) that stays silent where output is not one (logs, CI)."""

from __future__ import annotations


def progress(total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"  {desc}", unit=unit, leave=False, disable=None, dynamic_ncols=True)
