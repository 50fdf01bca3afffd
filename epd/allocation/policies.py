"""Allocation policies: given the stage loads, name one worker to move and where (or nothing).

static     the deployment as configured.
queue      moves one worker from the least to the most pressured stage, with hysteresis (the gap
           must be large), patience (for several looks in a row) and a minimum of one worker a stage.
simulated  re-runs the simulator on the recent window of requests for every E/P/D split of the
           current workers, in a background thread, and walks toward the best split one move at a time.
scripted   moves at given times (tests and experiments).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from typing import Optional

from epd.allocation.load import STAGES, StageLoad
from epd.config import AllocationConfig, RunConfig
from epd.registry import Registry
from epd.stages.instance import Instance
from epd.stages.pipeline import Pipeline

log = logging.getLogger(__name__)
Move = tuple[str, str]  # (instance id, target pool)


# (recent requests, workers) -> the best {stage: workers} for them; the simulator provides one
SplitSearch = Callable[[list, int], dict[str, int]]


class Policy(ABC):
    def __init__(self, cfg: AllocationConfig, run: Optional[RunConfig] = None, split_search: Optional[SplitSearch] = None):
        self.cfg, self.run = cfg, run

    @abstractmethod
    def decide(self, pipe: Pipeline, loads: dict[str, StageLoad], t: float) -> Optional[Move]: ...

    def close(self) -> None:
        """Stop background work."""
        return None


POLICIES: Registry[type[Policy]] = Registry("allocation policy")


def _idlest(insts: list[Instance]) -> Instance:
    """The worker that drains soonest: not busy, least queued and running."""
    return min(insts, key=lambda i: (i.busy, i.load(), i.outgoing, i.id))


@POLICIES.register("static")
class StaticPolicy(Policy):
    def decide(self, pipe, loads, t):
        return None


@POLICIES.register("scripted")
class ScriptedPolicy(Policy):
    """`allocation.script`: "T:INSTANCE:POOL" entries, applied in time order once the run clock passes T."""

    def __init__(self, cfg, run=None, split_search=None):
        super().__init__(cfg, run)
        entries = []
        for item in cfg.script:
            try:
                t, iid, pool = item.split(":")
                entries.append((float(t), iid, pool))
            except ValueError as exc:
                raise ValueError(f"allocation.script entry {item!r}: expected 'TIME:INSTANCE:POOL'") from exc
        self.entries = sorted(entries, key=lambda e: e[0])  # stable: equal times keep their order

    def decide(self, pipe, loads, t):
        if self.entries and self.entries[0][0] <= t:
            _, iid, pool = self.entries.pop(0)
            return iid, pool
        return None


@POLICIES.register("queue")
class QueuePolicy(Policy):
    def __init__(self, cfg, run=None, split_search=None):
        super().__init__(cfg, run)
        self.streak: Optional[tuple[str, str]] = None
        self.count = 0

    def decide(self, pipe, loads, t):
        movable = [s for s in STAGES if s in pipe.deployment.pools()]
        if len(movable) < 2:
            return None
        hi = max(movable, key=lambda s: loads[s].pressure)
        donors = [s for s in movable if s != hi and len(pipe.active(s)) > 1]
        if not donors:
            self.streak, self.count = None, 0
            return None
        lo = min(donors, key=lambda s: loads[s].pressure)
        hot, cold = loads[hi].pressure, loads[lo].pressure
        if hot < self.cfg.min_pressure or hot < self.cfg.hysteresis * max(cold, 0.05):
            self.streak, self.count = None, 0
            return None
        self.count = self.count + 1 if self.streak == (lo, hi) else 1
        self.streak = (lo, hi)
        if self.count < self.cfg.patience:
            return None
        self.streak, self.count = None, 0
        return _idlest(pipe.active(lo)).id, hi


@POLICIES.register("simulated")
class SimulatedPolicy(Policy):
    """Search in the simulator (off the serving thread), then move toward its best split."""

    def __init__(self, cfg, run=None, split_search: Optional[SplitSearch] = None):
        super().__init__(cfg, run)
        if split_search is None:
            raise ValueError("allocation.policy=simulated needs a split search (the simulator's best_split for the run's config)")
        self.split_search = split_search
        self.target: Optional[dict[str, int]] = None
        self.searches = 0
        self._thread: Optional[threading.Thread] = None
        self._next_search = 0.0
        self.inline = False  # the simulator's clock stands still while it searches: no thread needed there

    def decide(self, pipe, loads, t):
        if (self._thread is None or not self._thread.is_alive()) and t >= self._next_search:
            window = self._window(pipe)
            if window:
                workers = sum(1 for i in pipe.instances.values() if not i.failed)
                self._next_search = t + max(self.cfg.interval_s * 5, 1.0)
                if self.inline:
                    self._search(window, workers)
                else:
                    self._thread = threading.Thread(target=self._search, args=(window, workers), daemon=True)
                    self._thread.start()
        if self.target is None:
            return None
        now = Counter(i.switching_to or i.pool for i in pipe.instances.values() if not i.failed)
        surplus = [s for s in STAGES if now.get(s, 0) > self.target.get(s, 0) and len(pipe.active(s)) > 1]
        deficit = [s for s in STAGES if now.get(s, 0) < self.target.get(s, 0)]
        if not surplus or not deficit:
            return None
        return _idlest(pipe.active(surplus[0])).id, deficit[0]

    def _window(self, pipe: Pipeline) -> list:
        """The last `window` requests seen, with their arrival times (seconds from the first of them)."""
        states = sorted(pipe.states.values(), key=lambda s: s.req.arrival_time)[-self.cfg.window :]
        if len(states) < 8:
            return []
        t0 = states[0].req.arrival_time
        return [dataclasses.replace(s.req, arrival_time=s.req.arrival_time - t0) for s in states]

    def _search(self, window: list, workers: int) -> None:
        try:
            self.target = self.split_search(window, workers)
            self.searches += 1
            log.info("simulated allocation: best split of %d workers for the last %d requests: %s", workers, len(window), self.target)
        except Exception:  # a failed search leaves the deployment as it is
            log.exception("simulated allocation search failed")
