"""Scores from lifetime events alone (pure functions): latency, stage times, SLO attainment, goodput."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from epd.lifetime import SYSTEM_EVENTS, Event
from epd.lifetime import LifetimeEvent as Ev

# The fields every run's summary.json carries (more may follow: stage means, run metadata).
SUMMARY_KEYS = (
    "num_requests",
    "num_finished",
    "num_aborted",
    "ttft_mean",
    "ttft_p50",
    "ttft_p90",
    "ttft_p99",
    "tpot_mean",
    "tpot_p50",
    "tpot_p90",
    "tpot_p99",
    "e2e_p50",
    "e2e_p90",
    "slo_attainment",
    "request_throughput",
    "output_throughput",
    "deployment",
)


@dataclass
class Timeline:
    request_id: str
    first: dict[Ev, float] = field(default_factory=dict)  # first time of each event kind
    last: dict[Ev, float] = field(default_factory=dict)
    num_output_tokens: int = 0
    abort_reason: Optional[str] = None

    def at(self, kind: Ev) -> Optional[float]:
        return self.first.get(kind)

    @property
    def finished(self) -> bool:
        return Ev.FINISHED in self.first

    @property
    def ttft(self) -> Optional[float]:
        if Ev.FIRST_TOKEN not in self.first:
            return None
        return self.first[Ev.FIRST_TOKEN] - self.first[Ev.ISSUED]

    @property
    def tpot(self) -> Optional[float]:
        """(finish - first token) / (n_out - 1); None for one-token outputs."""
        if not self.finished or self.num_output_tokens < 2 or Ev.FIRST_TOKEN not in self.first:
            return None  # a client that saw no token (all held back, or none decodable) cannot time them
        return (self.first[Ev.FINISHED] - self.first[Ev.FIRST_TOKEN]) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> Optional[float]:
        return self.first[Ev.FINISHED] - self.first[Ev.ISSUED] if self.finished else None


def timelines(events: Iterable[Event]) -> dict[str, Timeline]:
    out: dict[str, Timeline] = {}
    for ev in sorted(events, key=lambda e: e.time):
        if ev.kind in SYSTEM_EVENTS:
            continue
        tl = out.setdefault(ev.request_id, Timeline(ev.request_id))
        tl.first.setdefault(ev.kind, ev.time)
        if Ev.PREEMPTED not in tl.first or ev.kind in (Ev.TOKEN, Ev.FINISHED, Ev.ABORTED):
            tl.last[ev.kind] = ev.time  # stage times are of a request's first pass, not its recompute
        if ev.kind == Ev.FINISHED:
            tl.num_output_tokens = int(ev.data.get("num_output_tokens", 0))
        elif ev.kind == Ev.ABORTED:
            tl.abort_reason = ev.data.get("reason")
    return out


def stage_times(tl: Timeline) -> dict[str, float]:
    """Queueing (waiting for a stage) and service (in it) per stage; transfers separately.

    A stage's queueing runs from the previous stage's end to its own begin, less the transfer.
    """
    f, la = tl.first, tl.last
    out: dict[str, float] = {}
    ready = f.get(Ev.ISSUED)
    if Ev.ENCODE_BEGIN in f:
        out["encode_queue"] = f[Ev.ENCODE_BEGIN] - ready
        out["encode_service"] = la[Ev.ENCODE_END] - f[Ev.ENCODE_BEGIN]
        ready = la[Ev.ENCODE_END]
    if Ev.MM_TRANSFER_BEGIN in f:
        out["mm_transfer"] = la[Ev.MM_TRANSFER_END] - f[Ev.MM_TRANSFER_BEGIN]
    if Ev.PREFILL_BEGIN in f:
        out["prefill_queue"] = f[Ev.PREFILL_BEGIN] - ready - out.get("mm_transfer", 0.0)
        out["prefill_service"] = f[Ev.PREFILL_END] - f[Ev.PREFILL_BEGIN]
        ready = f[Ev.PREFILL_END]
    if Ev.KV_TRANSFER_BEGIN in f:
        out["kv_transfer"] = f[Ev.KV_TRANSFER_END] - f[Ev.KV_TRANSFER_BEGIN]
    if Ev.DECODE_BEGIN in f:
        out["decode_queue"] = f[Ev.DECODE_BEGIN] - ready - out.get("kv_transfer", 0.0)
        if Ev.FINISHED in f:
            out["decode_service"] = f[Ev.FINISHED] - f[Ev.DECODE_BEGIN]
    return out


def scheduling_counts(events: list) -> dict:
    """What the schedulers' features did: preemptions, requests redone after a worker died, encoder-cache
    hits, prefill work saved."""
    encodes = [e for e in events if e.kind == Ev.ENCODE_END]
    hits = sum(1 for e in encodes if e.data.get("cached"))
    prefills = [e for e in events if e.kind == Ev.PREFILL_BEGIN]
    computed = sum(e.data.get("tokens", 0) - e.data.get("cached_tokens", 0) for e in prefills)
    cached = sum(e.data.get("cached_tokens", 0) for e in prefills)
    return {
        "preemptions": sum(1 for e in events if e.kind == Ev.PREEMPTED and e.data.get("cause", "preempted") == "preempted"),
        "restarted_after_worker_loss": sum(1 for e in events if e.kind == Ev.PREEMPTED and e.data.get("cause") == "worker_lost"),
        "restarted_after_failed_pull": sum(1 for e in events if e.kind == Ev.PREEMPTED and e.data.get("cause") == "pull_failed"),
        "recomputed_prefills": sum(1 for e in prefills if e.data.get("recompute")),
        "encoder_cache_hits": hits,
        "encoder_cache_hit_rate": hits / len(encodes) if encodes else 0.0,
        "prefill_tokens_computed": computed,
        "prefix_cache_hit_rate": cached / (cached + computed) if cached + computed else 0.0,
    }


def meets_slo(tl: Timeline, ttft: float, tpot: float) -> bool:
    if not tl.finished or tl.ttft is None or tl.ttft > ttft:
        return False
    return tl.tpot is None or tl.tpot <= tpot


def slo_attainment(tls: dict[str, Timeline], ttft: float, tpot: float) -> float:
    """Share of all issued requests (aborted ones count as misses) that meet both targets."""
    if not tls:
        return 0.0
    return sum(meets_slo(tl, ttft, tpot) for tl in tls.values()) / len(tls)


def goodput(points, target: float = 0.9) -> Optional[float]:
    """The highest rate whose SLO attainment reaches `target`, interpolated linearly between the
    swept rates where attainment crosses it. `points`: (rate, attainment) pairs or {rate: attainment}.
    None when even the lowest rate misses the target; the highest rate swept when none misses it.
    The one definition: compare tables, the notebooks and W&B all use it."""
    points = sorted(points.items() if isinstance(points, dict) else points)
    if not points or points[0][1] < target:
        return None
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1) if a0 > a1 else r0
    return float(points[-1][0])


def percentile(values: list[float], q: float) -> Optional[float]:
    """The q-th percentile of `values` (None for none): what every summary key _p50, _p90... is."""
    return float(np.percentile(values, q)) if values else None


def _mean(values: list[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def transfer_bandwidth(events: Iterable[Event], min_bytes: int = 16 << 20) -> dict[str, list[float]]:
    """Bytes/s of every MM and KV transfer of at least `min_bytes` (begin events carry the bytes)."""
    begins: dict[tuple[str, str], tuple[float, int]] = {}
    out: dict[str, list[float]] = {"mm": [], "kv": []}
    pairs = {Ev.MM_TRANSFER_BEGIN: "mm", Ev.KV_TRANSFER_BEGIN: "kv"}
    ends = {Ev.MM_TRANSFER_END: "mm", Ev.KV_TRANSFER_END: "kv"}
    for e in events:
        if e.kind in pairs and "bytes" in e.data:
            begins[(e.request_id, pairs[e.kind])] = (e.time, e.data["bytes"])
        elif e.kind in ends and (e.request_id, ends[e.kind]) in begins:
            t0, nbytes = begins.pop((e.request_id, ends[e.kind]))
            if nbytes >= min_bytes and e.time > t0:
                out[ends[e.kind]].append(nbytes / (e.time - t0))
    return out


def summarize(events: Iterable[Event], ttft_slo: float, tpot_slo: float, deployment: str, tls: Optional[dict] = None) -> dict:
    """`tls`: the events' timelines, when the caller has them already."""
    events = list(events)
    tls = timelines(events) if tls is None else tls
    done = [tl for tl in tls.values() if tl.finished]
    ttfts = [tl.ttft for tl in done if tl.ttft is not None]
    tpots = [tl.tpot for tl in done if tl.tpot is not None]
    e2es = [tl.e2e for tl in done if tl.e2e is not None]
    start = min((tl.first[Ev.ISSUED] for tl in tls.values()), default=0.0)
    end = max((tl.first[Ev.FINISHED] for tl in done), default=start)
    span = max(end - start, 1e-9)
    out_tokens = sum(tl.num_output_tokens for tl in done)
    summary = {
        "deployment": deployment,
        "num_requests": len(tls),
        "num_finished": len(done),
        "num_aborted": sum(1 for tl in tls.values() if Ev.ABORTED in tl.first),
        "duration": span if done else 0.0,
        "ttft_mean": _mean(ttfts),
        "tpot_mean": _mean(tpots),
        "slo_ttft": ttft_slo,
        "slo_tpot": tpot_slo,
        "slo_attainment": slo_attainment(tls, ttft_slo, tpot_slo),
        "request_throughput": len(done) / span if done else 0.0,
        "output_throughput": out_tokens / span if done else 0.0,
        "output_tokens": out_tokens,
    }
    for name, vals, qs in (("ttft", ttfts, (50, 90, 99)), ("tpot", tpots, (50, 90, 99)), ("e2e", e2es, (50, 90))):
        for q in qs:
            summary[f"{name}_p{q}"] = percentile(vals, q)
    stages: dict[str, list[float]] = {}
    for tl in done:
        for k, v in stage_times(tl).items():
            stages.setdefault(k, []).append(v)
    for k, vals in sorted(stages.items()):
        summary[f"{k}_mean"] = _mean(vals)
    summary.update(scheduling_counts(events))
    switches = [e for e in events if e.kind == Ev.ROLE_SWITCH_END]
    summary["role_switches"] = len(switches)
    summary["role_switch_mean_s"] = _mean([e.data["duration"] for e in switches])
    summary["role_switch_reload_mean_s"] = _mean([e.data["reload"] for e in switches])
    for k, vals in transfer_bandwidth(events).items():  # transfers of >= 16 MiB
        summary[f"{k}_transfer_GBps_p50"] = percentile(vals, 50) / 1e9 if vals else None
        summary[f"{k}_transfer_count_16MiB"] = len(vals)
    return summary
