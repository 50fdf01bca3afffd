"""Turns a policy's decisions into role switches, at most one at a time, on the engine's or the
simulator's clock. It never waits: a switch starts (the worker drains) and ends (the worker
reloads) as batches complete."""

from __future__ import annotations

import logging
from typing import Optional

from epd.allocation.load import LoadEstimator
from epd.allocation.policies import POLICIES, Policy, SplitSearch
from epd.config import RunConfig
from epd.stages.pipeline import Pipeline

log = logging.getLogger(__name__)


class AllocationController:
    def __init__(self, policy: Policy, interval_s: float, cooldown_s: float):
        self.policy = policy
        self.interval_s, self.cooldown_s = interval_s, cooldown_s
        self.estimator = LoadEstimator()
        self._next = 0.0
        self._cooldown_until = 0.0
        self._was_switching = False
        self.rejected: list[str] = []

    @property
    def stage_load(self) -> list[dict]:
        return self.estimator.history

    def tick(self, pipe: Pipeline, now: float) -> None:
        """`now` on the pipeline's clock (wall time for the engine, virtual time for the simulator)."""
        if now < self._next:
            return
        self._next = now + self.interval_s
        t = now - pipe.origin
        loads = self.estimator.observe(pipe, t)
        if pipe.switching:
            self._was_switching = True
            return
        if self._was_switching:
            self._was_switching = False
            self._cooldown_until = now + self.cooldown_s
        if now < self._cooldown_until:
            return
        move = self.policy.decide(pipe, loads, t)
        if move is None:
            return
        try:
            pipe.begin_switch(move[0], move[1], now)
            log.info("allocation: %s -> %s at t=%.2fs", move[0], move[1], t)
        except ValueError as exc:  # e.g. a scripted move that would empty a stage
            log.warning("allocation: move %s -> %s refused: %s", move[0], move[1], exc)
            self.rejected.append(f"{move[0]}->{move[1]}: {exc}")

    def close(self) -> None:
        self.policy.close()


def make_allocation(cfg: RunConfig, split_search: Optional[SplitSearch] = None) -> Optional[AllocationController]:
    """None for the static policy (nothing to do while serving). `split_search`: what the simulated
    policy searches with (given by the layer that owns a simulator)."""
    a = cfg.allocation
    if a.policy == "static":
        return None
    policy = POLICIES.get(a.policy)(a, cfg, split_search)
    return AllocationController(policy, a.interval_s, a.cooldown_s)
