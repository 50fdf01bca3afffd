"""Reading run records and plotting them: latency CDFs, SLO attainment vs rate, stage timelines."""

from __future__ import annotations

import json
import math
import os
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
        rate = "offline" if s.get("rate") is None else f"{s['rate']:g}/s"
        return f"{s.get('experiment', '')} {s['deployment']} {s['backend']} @ {rate}".strip()


REPO = Path(__file__).resolve().parents[1]  # the checkout: where epd.run writes multirun/ and outputs/


def record_roots(root: str | Path | None = None) -> list[Path]:
    """Where to look for run records: `root` if given, else $EPD_RECORDS, else the checkout's
    multirun/ and outputs/ — the same wherever the notebook's kernel was started."""
    root = root or os.environ.get("EPD_RECORDS")
    if root:
        return [Path(root).expanduser().resolve()]
    return [REPO / "multirun", REPO / "outputs"]


def load_record(path: str | Path) -> Record:
    path = Path(path)
    summary = json.loads((path / "summary.json").read_text())
    requests = pd.read_json(path / "requests.jsonl", lines=True)
    return Record(path, summary, requests, EventLog.read_jsonl(path / "events.jsonl"))


def find_records(root: str | Path | None = None) -> list[Record]:
    """Every run record below `root` (a run dir, a sweep dir, outputs/; default: `record_roots()`)."""
    paths = [p for r in record_roots(root) if r.exists() for p in sorted(r.rglob("summary.json"))]
    return [load_record(p.parent) for p in paths]


GROUP = ["experiment", "model", "workload", "deployment", "backend"]  # what makes runs one curve


def configuration(record: Record) -> tuple:
    """The choices a curve of runs shares (everything but the rate)."""
    return tuple(record.summary.get(k) for k in GROUP)


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
    """One row per run with its configuration, rate and attainment (95% Wilson interval)."""
    rows = []
    for r in records:
        s = r.summary
        low, high = wilson(round(s["slo_attainment"] * s["num_requests"]), s["num_requests"])
        rows.append({**dict(zip(GROUP, configuration(r))), "rate": s["rate"], "requests": s["num_requests"],
                     "slo_attainment": s["slo_attainment"], "attainment_low": low, "attainment_high": high})  # fmt: skip
    return pd.DataFrame(rows).sort_values([*GROUP, "rate"], key=lambda c: c.astype(str) if c.name != "rate" else c)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (attainment over n requests)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def plot_attainment_vs_rate(records: list[Record], target: float = 0.9):
    """One curve per configuration (experiment, model, workload, deployment, backend), with its 95%
    band; offline runs have no rate and are left out."""
    table = attainment_table(records)
    table = table[table["rate"].notna()]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, grp in table.groupby(GROUP, dropna=False):
        gp = goodput(dict(zip(grp["rate"], grp["slo_attainment"])), target)
        name = " ".join(str(k) for k in (key[0], key[3], key[4]) if k)
        label = f"{name} goodput " + ("below the lowest rate" if gp is None else f"{gp:.2f}/s")
        line = ax.plot(grp["rate"], grp["slo_attainment"] * 100, marker="o", label=label)[0]
        ax.fill_between(grp["rate"], grp["attainment_low"] * 100, grp["attainment_high"] * 100, color=line.get_color(), alpha=0.15)
    ax.axhline(target * 100, color="grey", ls="--", lw=1)
    ax.set_xlabel("rate (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---- comparison experiments (task=compare: compare.json) ----------------------------------------
def find_compares(root: str | Path | None = None) -> list[tuple[Path, dict]]:
    """Every compare.json below the record roots, with its directory."""
    paths = [p for r in record_roots(root) if r.exists() for p in sorted(r.rglob("compare.json"))]
    return [(p.parent, json.loads(p.read_text())) for p in paths]


def compare_frame(result: dict) -> pd.DataFrame:
    """One row per point (deployment, source, rate): metric means, attainment with its 95% band —
    over seeds where a point ran several times, else the Wilson interval over its requests
    (compare.json files from before seeds carry only rows)."""
    points = result.get("points")
    if points and any(p["runs"] > 1 for p in points):
        flat = []
        for p in points:
            row = {k: v for k, v in p.items() if not isinstance(v, dict)}
            row.update({k: v["mean"] for k, v in p.items() if isinstance(v, dict)})
            row["attainment_low"], row["attainment_high"] = p["slo_attainment"]["lo"], p["slo_attainment"]["hi"]
            flat.append(row)
        return pd.DataFrame(flat)
    frame = pd.DataFrame(result["rows"])
    bands = [wilson(round(a * n), n) for a, n in zip(frame["slo_attainment"], frame["num_requests"])]
    frame["attainment_low"], frame["attainment_high"] = zip(*bands) if bands else ([], [])
    return frame


def plot_compare_attainment(result: dict):
    """Attainment vs rate per deployment, engine solid and simulator dashed, with 95% bands."""
    frame = compare_frame(result)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (dep, source), grp in frame.groupby(["deployment", "source"]):
        grp = grp.sort_values("rate")
        line = ax.plot(
            grp["rate"], grp["slo_attainment"] * 100, marker="o", ls="-" if source == "engine" else "--", label=f"{dep} ({source})"
        )[0]
        ax.fill_between(grp["rate"], grp["attainment_low"] * 100, grp["attainment_high"] * 100, color=line.get_color(), alpha=0.12)
    ax.axhline(result["attainment_target"] * 100, color="grey", ls=":", lw=1)
    ax.set_xlabel("rate (requests/s)" + (" (offline runs: nominal)" if result.get("arrival") == "offline" else ""))
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(f"{result['experiment']}: {result['model']}, {result['workload']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_goodput(result: dict):
    """Goodput per deployment and source (a bar at 0 where even the lowest rate missed the target)."""
    keys = sorted(result["goodput"])
    values = [result["goodput"][k] or 0.0 for k in keys]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(keys) + 1))
    ax.barh(keys, values, color=["tab:blue" if k.endswith("/engine") else "tab:orange" for k in keys])
    ax.set_xlabel("goodput (requests/s within the SLO)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def plot_sim_vs_engine(result: dict):
    """The simulator's TTFT/TPOT p50 against the engine's at the same points (the diagonal is exact)."""
    frame = compare_frame(result)
    both = frame.pivot_table(index=["deployment", "rate"], columns="source", values=["ttft_p50", "tpot_p50"])
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, metric in zip(axes, ("ttft_p50", "tpot_p50")):
        if ("engine" in both[metric]) and ("simulator" in both[metric]):
            x, y = both[metric]["engine"] * 1000, both[metric]["simulator"] * 1000
            ax.scatter(x, y)
            top = max(float(x.max()), float(y.max()), 1e-3)
            ax.plot([0, top], [0, top], color="grey", lw=1)
        ax.set_xlabel(f"engine {metric} (ms)")
        ax.set_ylabel(f"simulator {metric} (ms)")
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
