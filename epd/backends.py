"""Backends run a workload and return its events: the real engine (Ray or in-process) or the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from typing import Optional

from epd.allocation import make_allocation
from epd.config import EngineConfig, RunConfig
from epd.progress import progress
from epd.request import Request
from epd.run_result import RunResult, batch_rows, batch_stats

log = logging.getLogger(__name__)


class EngineBackend:
    """The real engine. Offline workloads go through the offline API, timed ones through the async API.

    Inside `with backend.session():` the workers stay up between `run` calls (a rate sweep pays the
    start-up once); outside, each run starts and stops its own workers.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.executor = "local" if cfg.backend.kind == "local" else "ray"
        self.engine_config = EngineConfig(cfg.model, cfg.deployment, self.executor, cfg.backend)
        self._llm = None
        self.startup_s: Optional[float] = None  # seconds until the last engine built was ready
        self.warmup_s: Optional[float] = None
        self.start_phases: dict[str, float] = {}  # the driver's view of start-up before the warm-up

    def _async_llm(self):
        from epd.serve.async_llm import AsyncLLM

        started = time.time()
        llm = AsyncLLM(self.engine_config, allocation=self._allocation())
        llm.core.worker_info()  # every worker up
        self._ready(time.time() - started, llm.core)
        return llm

    def _ready(self, seconds: float, core) -> None:
        """Workers are built, loaded and warmed up: runs measure from here (start-up stays out of the window)."""
        self.startup_s, self.warmup_s = seconds, core.warmup_s
        self.start_phases = core.start_phases()
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.start_phases.items())
        warm = f"warm-up {self.warmup_s:.1f} s" if self.warmup_s is not None else "no warm-up"
        print(f"  engine     {self.cfg.deployment.describe()} ready in {seconds:.1f} s ({parts}, {warm})", flush=True)

    def _allocation(self):
        from simulator.backend import best_split

        return make_allocation(self.cfg, functools.partial(best_split, self.cfg))

    @contextlib.contextmanager
    def session(self) -> Iterator[EngineBackend]:
        self._llm = self._async_llm()
        try:
            yield self
        finally:
            llm, self._llm = self._llm, None
            llm.close()

    def run(self, requests: list[Request]) -> RunResult:
        if self._llm is not None:
            return self._run_async(self._llm, requests)
        if all(r.arrival_time == 0 for r in requests):
            return self._run_offline(requests)
        llm = self._async_llm()
        try:
            return self._run_async(llm, requests)
        finally:
            llm.close()

    def _run_offline(self, requests: list[Request]) -> RunResult:
        from epd.serve.offline import OfflineLLM

        started = time.time()
        with OfflineLLM(self.engine_config, allocation=self._allocation()) as llm:
            workers = llm.core.worker_info()
            self._ready(time.time() - started, llm.core)
            llm.core.reset_clock()
            with progress(len(requests), "requests", "req") as bar:
                outputs = llm.generate(requests, timeout_s=self.cfg.backend.timeout_s, on_finished=bar.update)
            return self._result(llm.core, workers, {o.request_id: o for o in outputs})

    def _run_async(self, llm, requests: list[Request]) -> RunResult:
        llm.stop_loop()  # quiet while the previous run's state is cleared
        llm.core.new_run()
        workers = llm.core.worker_info()
        llm.core.reset_clock()
        llm.start_loop()
        asyncio.run(self._drive(llm, requests))
        llm.wait_idle(timeout_s=self.cfg.backend.timeout_s)
        llm.stop_loop()
        return self._result(llm.core, workers)

    def _result(self, core, workers: list[dict], outputs: Optional[dict] = None) -> RunResult:
        core.drain_check()
        stage_load = list(core.allocation.stage_load) if core.allocation is not None else []
        outputs = dict(core.pipeline.outputs) if outputs is None else outputs
        return RunResult(
            core.pipeline.events,
            outputs,
            workers,
            list(core.timeseries),
            stage_load,
            startup_s=self.startup_s,
            warmup_s=self.warmup_s,
            start_phases=dict(self.start_phases),
            batch_stats=batch_stats(core.batches),
            batches=batch_rows(core.batches, core.origin),
        )

    async def _drive(self, llm, requests: list[Request]) -> None:
        start = time.time()
        with progress(len(requests), "requests", "req") as bar:

            async def one(req: Request) -> None:
                delay = start + req.arrival_time - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                async for _ in llm.generate(req):
                    pass
                bar.update(1)

            await asyncio.wait_for(asyncio.gather(*(one(r) for r in requests)), timeout=self.cfg.backend.timeout_s)


def make_backend(cfg: RunConfig):
    if cfg.backend.kind in ("ray", "local"):
        return EngineBackend(cfg)
    if cfg.backend.kind == "online":
        from epd.serve.loadgen import OnlineBackend

        return OnlineBackend(cfg)
    if cfg.backend.kind == "sim":
        from simulator.backend import SimBackend

        return SimBackend(cfg)
    raise ValueError(f"unknown backend.kind {cfg.backend.kind!r} (ray, local, sim, online)")
