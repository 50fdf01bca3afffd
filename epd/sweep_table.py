"""At the end of a Hydra multirun: one table across the sweep's jobs, read from their run records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = []
        if overrides_file.exists():
            overrides = [ln.removeprefix("- ").strip() for ln in overrides_file.read_text().splitlines() if ln.startswith("- ")]
        summary_file = job / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        rows.append({"job": int(job.name), "overrides": " ".join(overrides), "summary": summary, "failed": (job / "FAILED").exists()})
    return rows


def format_sweep(rows: list[dict[str, Any]]) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    lines = [f"{'job':>3}  {'finished':>8}  {'TTFT p50':>8}  {'TPOT p50':>8}  {'SLO':>5}  {'req/s':>6}  overrides"]
    for r in rows:
        s = r["summary"]
        if s is None:
            lines.append(
                f"{r['job']:>3}  {'FAILED' if r['failed'] else 'no record':>8}  {'':>8}  {'':>8}  {'':>5}  {'':>6}  {r['overrides']}"
            )
            continue
        lines.append(
            f"{r['job']:>3}  {s['num_finished']:>4}/{s['num_requests']:<3}  {ms(s['ttft_p50']):>8}  {ms(s['tpot_p50']):>8}  "
            f"{s['slo_attainment']:>5.0%}  {s['request_throughput']:>6.2f}  {r['overrides']}"
        )
    return "\n".join(lines)


class SweepTable(Callback):
    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows = sweep_rows(sweep_dir)
        if rows:
            table = format_sweep(rows)
            (sweep_dir / "sweep.md").write_text("```\n" + table + "\n```\n")
            print(f"\nSweep of {len(rows)} jobs ({sweep_dir}):\n{table}", flush=True)
