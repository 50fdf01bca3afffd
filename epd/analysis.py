"""Reading run records and plotting them: latency CDFs, SLO attainment vs rate, stage timelines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt  # headless scripts fall back to Agg; notebooks keep their inline backend
import pandas as pd

from epd.lifetime import EventLog
from epd.lifetime import LifetimeEvent as Ev
from epd.metrics import goodput


@dataclass
class Record:
    path: Path
    summary: dict
    requests: pd.DataFrame
    events: EventLog

    @property
    def label(self) -> str:
        s = self.summary
        return f"{s['deployment']} {s['backend']} @ {s['rate']:g}/s"


def load_record(path: str | Path) -> Record:
    path = Path(path)
    summary = json.loads((path / "summary.json").read_text())
    requests = pd.read_json(path / "requests.jsonl", lines=True)
    return Record(path, summary, requests, EventLog.read_jsonl(path / "events.jsonl"))


def find_records(root: str | Path) -> list[Record]:
    """Every run record below `root` (a run dir, a sweep dir, or outputs/)."""
    return [load_record(p.parent) for p in sorted(Path(root).rglob("summary.json"))]


def plot_cdfs(records: list[Record]):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for rec in records:
        for ax, col in zip(axes, ("ttft", "tpot")):
            vals = rec.requests[col].dropna().sort_values()
            if len(vals):
                ax.step(vals * 1000, (pd.RangeIndex(1, len(vals) + 1) / len(vals)), where="post", label=rec.label)
    for ax, name in zip(axes, ("TTFT", "TPOT")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("share of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def attainment_table(records: list[Record]) -> pd.DataFrame:
    rows = [
        {
            "deployment": r.summary["deployment"],
            "backend": r.summary["backend"],
            "rate": r.summary["rate"],
            "slo_attainment": r.summary["slo_attainment"],
        }
        for r in records
    ]
    return pd.DataFrame(rows).sort_values(["deployment", "backend", "rate"])


def plot_attainment_vs_rate(records: list[Record], target: float = 0.9):
    table = attainment_table(records)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (dep, backend), grp in table.groupby(["deployment", "backend"]):
        gp = goodput(dict(zip(grp["rate"], grp["slo_attainment"])), target)
        label = f"{dep} ({backend}) goodput " + ("below the lowest rate" if gp is None else f"{gp:.2f}/s")
        ax.plot(grp["rate"], grp["slo_attainment"] * 100, marker="o", label=label)
    ax.axhline(target * 100, color="grey", ls="--", lw=1)
    ax.set_xlabel("rate (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


SPANS = [
    ("encode", Ev.ENCODE_BEGIN, Ev.ENCODE_END, "tab:orange"),
    ("mm transfer", Ev.MM_TRANSFER_BEGIN, Ev.MM_TRANSFER_END, "tab:gray"),
    ("prefill", Ev.PREFILL_BEGIN, Ev.PREFILL_END, "tab:blue"),
    ("kv transfer", Ev.KV_TRANSFER_BEGIN, Ev.KV_TRANSFER_END, "tab:gray"),
    ("decode", Ev.DECODE_BEGIN, Ev.FINISHED, "tab:green"),
]


def plot_timeline(record: Record, max_requests: int = 40):
    """Per-request Gantt: when each stage ran (waiting shows as gaps)."""
    by_req = record.events.by_request()
    rids = sorted(by_req, key=lambda r: by_req[r][0].time)[:max_requests]
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(rids) + 1))
    for y, rid in enumerate(rids):
        first: dict = {}
        last: dict = {}
        for ev in by_req[rid]:
            first.setdefault(ev.kind, ev.time)
            last[ev.kind] = ev.time
        ax.plot([first[Ev.ISSUED]], [y], "k|")
        for name, b, e, color in SPANS:
            if b in first and e in last:
                ax.barh(y, last[e] - first[b], left=first[b], color=color, label=name if y == 0 else None, height=0.7)
    ax.set_yticks(range(len(rids)), rids, fontsize=6)
    ax.set_xlabel("time since start (s)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncols=5, loc="lower right")
    fig.tight_layout()
    return fig
