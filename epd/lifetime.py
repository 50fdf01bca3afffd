"""The one event vocabulary of a request's life, shared by the real engine and the simulator.

Times are seconds on one clock: the engine uses wall time relative to the run's start, the
simulator its virtual time. `epd.metrics` scores either stream unchanged.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional


class LifetimeEvent(str, enum.Enum):
    ISSUED = "issued"
    ENCODE_BEGIN = "encode_begin"
    ENCODE_END = "encode_end"
    MM_TRANSFER_BEGIN = "mm_transfer_begin"
    MM_TRANSFER_END = "mm_transfer_end"
    PREFILL_BEGIN = "prefill_begin"
    PREFILL_END = "prefill_end"
    FIRST_TOKEN = "first_token"
    KV_TRANSFER_BEGIN = "kv_transfer_begin"
    KV_TRANSFER_END = "kv_transfer_end"
    DECODE_BEGIN = "decode_begin"
    TOKEN = "token"
    PREEMPTED = "preempted"  # its KV was freed for others; it is recomputed (encode hit, prefill) and goes on
    FINISHED = "finished"
    ABORTED = "aborted"
    # Worker events (request_id is SYSTEM): a worker leaves one stage for another while serving.
    ROLE_SWITCH_BEGIN = "role_switch_begin"
    ROLE_SWITCH_END = "role_switch_end"
    WORKER_LOST = "worker_lost"  # a worker's process died: its instance is out of service
    WORKER_REPLACED = "worker_replaced"  # a new worker for a lost instance is up: the instance serves again


SYSTEM = ""  # the request_id of events that belong to no request
SYSTEM_EVENTS = frozenset(
    {LifetimeEvent.ROLE_SWITCH_BEGIN, LifetimeEvent.ROLE_SWITCH_END, LifetimeEvent.WORKER_LOST, LifetimeEvent.WORKER_REPLACED}
)


@dataclass(frozen=True)
class Event:
    time: float
    request_id: str
    kind: LifetimeEvent
    instance: Optional[str] = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["kind"] = self.kind.value
        return row

    @staticmethod
    def from_row(row: dict[str, Any]) -> Event:
        return Event(row["time"], row["request_id"], LifetimeEvent(row["kind"]), row.get("instance"), row.get("data") or {})


class EventLog:
    """Append-only list of events; `shift` moves a wall-clock log onto run-relative time. With a
    `capacity` (a server that runs for weeks) only the latest that many are kept."""

    def __init__(self, events: Iterable[Event] = (), capacity: Optional[int] = None):
        self._events: list[Event] | deque[Event] = list(events) if capacity is None else deque(events, maxlen=capacity)

    def emit(self, time: float, request_id: str, kind: LifetimeEvent, instance: Optional[str] = None, **data: Any) -> None:
        self._events.append(Event(time, request_id, kind, instance, data))

    def extend(self, events: Iterable[Event]) -> None:
        self._events.extend(events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def __len__(self) -> int:
        return len(self._events)

    def by_request(self) -> dict[str, list[Event]]:
        out: dict[str, list[Event]] = {}
        for ev in sorted(self._events, key=lambda e: e.time):
            if ev.kind not in SYSTEM_EVENTS:
                out.setdefault(ev.request_id, []).append(ev)
        return out

    def system(self) -> list[Event]:
        """Worker events (role switches), in time order."""
        return sorted((e for e in self._events if e.kind in SYSTEM_EVENTS), key=lambda e: e.time)

    def write_jsonl(self, path: Path) -> None:
        with open(path, "w") as f:
            for ev in sorted(self._events, key=lambda e: e.time):
                f.write(json.dumps(ev.to_row()) + "\n")

    @staticmethod
    def read_jsonl(path: Path) -> EventLog:
        with open(path) as f:
            return EventLog(Event.from_row(json.loads(line)) for line in f if line.strip())
