"""When a worker has gone silent: each instance's oldest batch in flight is timed from when it became
the oldest (its predecessor's reply, or its own submission, whichever came later); a reply later than
max(floor, factor x the typical time of that kind of batch on that instance) means the worker hangs.
A dead process is found by Ray; a hung one (a stuck kernel, a stopped process) only by a deadline."""

from __future__ import annotations

from typing import Optional


class BatchDeadlines:
    def __init__(self, factor: float, floor_s: float, smoothing: float = 0.2):
        self.factor, self.floor_s, self.smoothing = factor, floor_s, smoothing
        self.typical: dict[tuple[str, str], float] = {}  # (instance, batch kind) -> smoothed seconds
        self.head_since: dict[str, float] = {}  # instance -> when its oldest batch in flight became the oldest

    @property
    def enabled(self) -> bool:
        return self.floor_s > 0

    def submitted(self, iid: str, t: float) -> None:
        self.head_since.setdefault(iid, t)  # only if nothing of it was in flight

    def replied(self, iid: str, kind: str, t: float, more_in_flight: bool) -> None:
        since = self.head_since.pop(iid, t)
        took = max(0.0, t - since)
        old = self.typical.get((iid, kind))
        self.typical[(iid, kind)] = took if old is None else old + self.smoothing * (took - old)
        if more_in_flight:
            self.head_since[iid] = t

    def bound(self, iid: str, kind: str) -> float:
        return max(self.floor_s, self.factor * self.typical.get((iid, kind), 0.0))

    def overdue(self, iid: str, kind: str, now: float) -> Optional[tuple[float, float]]:
        """(waited, bound) when `iid`'s oldest batch (of `kind`) is past its deadline, else None."""
        if not self.enabled or iid not in self.head_since:
            return None
        waited = now - self.head_since[iid]
        bound = self.bound(iid, kind)
        return (waited, bound) if waited > bound else None

    def forget(self, iid: str) -> None:
        """`iid`'s worker is gone: its replacement starts with no batch in flight and no history."""
        self.head_since.pop(iid, None)
        for key in [k for k in self.typical if k[0] == iid]:
            del self.typical[key]
