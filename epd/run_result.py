"""What every backend returns for a workload: the engine (Ray or in-process), the simulator, the
online load generator; and the batch records engine and simulator both keep."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from epd.lifetime import EventLog
from epd.metrics import percentile, timelines
from epd.request import RequestOutput


@dataclass(frozen=True)
class BatchRecord:
    """One batch as the driver saw it: when it was sent (driver clock) and when its worker ran it."""

    instance: str
    kind: str  # EncodeBatch | PrefillBatch | DecodeBatch | SwitchBatch
    submitted: float
    begin: float
    end: float
    host_wait: float = 0.0  # an encode batch's wait for its images' host preparation (within begin..end)
    size: int = 0  # images encoded (encode: cache hits aside), prompts or chunks (prefill), sequences stepped (decode)
    compiled: int = 0  # kernels the worker compiled inside the batch (none in a warm engine; the simulator compiles none)

    @staticmethod
    def of(instance: str, batch, submitted: float, result) -> BatchRecord:
        """The record of `batch` sent at `submitted`, from its result (the engine's worker's or the simulator's)."""
        host_wait, compiled = getattr(result, "host_wait", 0.0), getattr(result, "compiled", 0)
        return BatchRecord(instance, type(batch).__name__, submitted, *result.span, host_wait, batch_size(batch), compiled)


def batch_size(batch) -> int:
    """What a batch record counts as its size (see BatchRecord.size); a mixed step: both parts."""
    if hasattr(batch, "decode") and hasattr(batch, "prefill"):
        return batch_size(batch.decode) + batch_size(batch.prefill)
    if hasattr(batch, "items"):  # an encode batch's cache hits run nothing: not counted
        return sum(1 for it in batch.items if not getattr(it, "cached", False))
    return len(getattr(batch, "step", ())) + len(getattr(batch, "new", ()))


@dataclass
class RunResult:
    events: EventLog
    outputs: dict[str, RequestOutput]
    workers: list[dict] = field(default_factory=list)
    timeseries: list[dict] = field(default_factory=list)
    stage_load: list[dict] = field(default_factory=list)  # per-stage load signals (epd.allocation.load)
    startup_s: Optional[float] = None  # engine start-up to ready (workers built and loaded, warm-up run), outside the measured window
    warmup_s: Optional[float] = None  # the warm-up's part of it
    start_phases: dict[str, float] = field(default_factory=dict)  # the rest of it, as the driver saw it (workers' own phases: workers)
    batch_stats: dict = field(default_factory=dict)  # per batch kind, how many and the workers' time in them
    server_split: dict = field(default_factory=dict)  # online runs with a local server: TTFT/TPOT inside the engine and outside it
    batches: list[dict] = field(default_factory=list)  # every batch's send, start and end (seconds on the run's clock)
    _timelines: Optional[dict] = field(default=None, repr=False, compare=False)

    def timelines(self) -> dict:
        """Per-request timelines of the events, computed once (summary, record and W&B share them)."""
        if self._timelines is None:
            self._timelines = timelines(self.events)
        return self._timelines


def batch_rows(batches, origin: float) -> list[dict]:
    """Batch records (the engine's or the simulator's) on the run's clock (the events' clock): when the driver sent each batch,
    when its worker began and ended it, how long it waited for its images' host work, its size, and the kernels
    compiled inside it."""
    return [
        {
            "instance": b.instance,
            "kind": b.kind.removesuffix("Batch").lower(),
            "submitted": round(b.submitted - origin, 6),
            "begin": round(b.begin - origin, 6),
            "end": round(b.end - origin, 6),
            "host_wait": round(b.host_wait, 6),
            "size": b.size,
            "compiled": b.compiled,
        }
        for b in batches
    ]


def batch_stats(batches) -> dict:
    """From batch records (engine or simulator): per kind (EncodeBatch, PrefillBatch, MixedBatch, DecodeBatch...)
    the count, the seconds workers spent in them and the mean batch in ms; where a run's time went. And the
    kernels compiled inside the run's batches: a warm engine compiles none, and each one costs its batch."""
    out: dict = {"kernels_compiled_in_run": sum(b.compiled for b in batches)}
    for b in batches:
        kind = b.kind.removesuffix("Batch").lower()
        out[f"batches_{kind}"] = out.get(f"batches_{kind}", 0) + 1
        out[f"busy_{kind}_s"] = out.get(f"busy_{kind}_s", 0.0) + (b.end - b.begin)
    for key in [k for k in out if k.startswith("batches_")]:
        kind = key.removeprefix("batches_")
        out[f"batch_{kind}_mean_ms"] = 1e3 * out[f"busy_{kind}_s"] / out[key]
    return {**out, **turnaround(batches)}


def turnaround(batches, window_s: float = 0.05) -> dict:
    """The driver's part of a batch that waits on the one before (a prefill on its images' encoding, a decode
    step on its prefill), from batch records: `return` from the worker ending a batch to the driver sending the
    next one, `send` from that to the worker starting it. Only where the worker sat idle between the two and
    the next was sent within `window_s` of the end (sent in answer to it); encode batches begin after their
    images' host work, so they are not counted as the next. The simulator's `rpc` is their sum."""
    by_instance: dict[str, list] = {}
    for b in batches:
        by_instance.setdefault(b.instance, []).append(b)
    returns, sends = [], []
    for mine in by_instance.values():
        mine.sort(key=lambda b: b.begin)
        for prev, nxt in zip(mine, mine[1:]):
            answered = prev.end <= nxt.submitted <= prev.end + window_s
            if answered and not nxt.kind.startswith("Encode") and nxt.begin >= nxt.submitted:
                returns.append(nxt.submitted - prev.end)
                sends.append(nxt.begin - nxt.submitted)
    if not returns:
        return {}
    return {
        "driver_turnarounds": len(returns),
        "driver_return_p50_ms": 1e3 * percentile(returns, 50),
        "driver_send_p50_ms": 1e3 * percentile(sends, 50),
    }
