"""Where batches run: Ray actors reserved with one placement group, or workers in this process."""

from __future__ import annotations

import logging
import os
import time
import traceback
from typing import Any, Optional

from epd.config import POOL_ROLES, BackendConfig, DeploymentConfig, ModelConfig
from epd.stages.work import Batch, BatchFailure, Result

log = logging.getLogger(__name__)
Done = tuple[str, Batch, "Result | BatchFailure"]


def _worker_specs(deployment: DeploymentConfig):
    for pool_name, pool in deployment.pools().items():
        for k in range(pool.instances):
            yield f"{pool_name}-{k}", POOL_ROLES[pool_name], pool


class LocalExecutor:
    """All workers in this process, batches run at submit time (benchmarks, single-GPU runs)."""

    transfer = "local"

    def __init__(self, deployment: DeploymentConfig, model: ModelConfig):
        from epd.stages.worker import Worker

        self.workers = {iid: Worker(iid, roles, model, pool, self.transfer) for iid, roles, pool in _worker_specs(deployment)}
        self._done: list[Done] = []

    def submit(self, iid: str, batch: Batch) -> None:
        try:
            result: Any = self.workers[iid].execute(batch)
        except Exception as exc:  # a failed batch aborts its requests, the run goes on
            log.error("worker %s failed:\n%s", iid, traceback.format_exc())
            result = BatchFailure(f"{type(exc).__name__}: {exc}", time.time())
        self._done.append((iid, batch, result))

    @property
    def inflight(self) -> int:
        return len(self._done)

    def wait(self, timeout: float) -> list[Done]:
        done, self._done = self._done, []
        return done

    def call(self, method: str, *args) -> dict[str, Any]:
        return {iid: getattr(w, method)(*args) for iid, w in self.workers.items()}

    def call_one(self, iid: str, method: str, *args) -> Any:
        return getattr(self.workers[iid], method)(*args)

    def shutdown(self) -> None:
        self.workers.clear()


class RayExecutor:
    transfer = "object_store"

    def __init__(self, deployment: DeploymentConfig, model: ModelConfig, backend: BackendConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from epd.stages.worker import Worker

        self.ray = ray
        self.transfer = deployment.transfer
        specs = list(_worker_specs(deployment))
        if not ray.is_initialized():
            need = int(sum(p.num_cpus for _, _, p in specs)) + 1
            kwargs: dict[str, Any] = (
                {"address": backend.address} if backend.address else {"num_cpus": max(need, backend.num_cpus or 0, os.cpu_count() or 1)}
            )
            ray.init(log_to_driver=False, include_dashboard=False, **kwargs)
            self._own_ray = True
        else:
            self._own_ray = False
        bundles = [{"CPU": p.num_cpus, **({"GPU": p.num_gpus} if p.num_gpus else {})} for _, _, p in specs]
        self.pg = placement_group(bundles, strategy="PACK")
        if not self.pg.wait(timeout_seconds=120):
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(f"cannot reserve {bundles} on the Ray cluster: {ray.cluster_resources()}")
        remote_cls = ray.remote(Worker)
        self.actors = {}
        for idx, (iid, roles, pool) in enumerate(specs):
            threads = max(1, int(pool.num_cpus))
            self.actors[iid] = remote_cls.options(
                num_cpus=pool.num_cpus,
                num_gpus=pool.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=idx),
            ).remote(iid, roles, model, pool, self.transfer, threads)
        ray.get([a.ping.remote() for a in self.actors.values()])  # surface construction errors now
        self._inflight: dict[Any, tuple[str, Batch]] = {}

    def submit(self, iid: str, batch: Batch) -> None:
        ref = self.actors[iid].execute.remote(batch)
        self._inflight[ref] = (iid, batch)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def wait(self, timeout: float) -> list[Done]:
        if not self._inflight:
            return []
        ready, _ = self.ray.wait(list(self._inflight), num_returns=1, timeout=timeout)
        if ready:  # collect everything else that is done too
            ready, _ = self.ray.wait(list(self._inflight), num_returns=len(self._inflight), timeout=0)
        out: list[Done] = []
        for ref in ready:
            iid, batch = self._inflight.pop(ref)
            try:
                result: Any = self.ray.get(ref)
            except Exception as exc:
                log.error("worker %s failed: %s", iid, exc)
                result = BatchFailure(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", time.time())
            out.append((iid, batch, result))
        return out

    def call(self, method: str, *args) -> dict[str, Any]:
        refs = {iid: getattr(a, method).remote(*args) for iid, a in self.actors.items()}
        return {iid: self.ray.get(r) for iid, r in refs.items()}

    def call_one(self, iid: str, method: str, *args) -> Any:
        return self.ray.get(getattr(self.actors[iid], method).remote(*args))

    def shutdown(self) -> None:
        for a in self.actors.values():
            self.ray.kill(a)
        self.actors.clear()
        self.ray.util.remove_placement_group(self.pg)
        if self._own_ray:
            self.ray.shutdown()


def make_executor(kind: str, deployment: DeploymentConfig, model: ModelConfig, backend: Optional[BackendConfig] = None):
    if kind == "local":
        return LocalExecutor(deployment, model)
    if kind == "ray":
        return RayExecutor(deployment, model, backend or BackendConfig())
    raise ValueError(f"unknown executor {kind!r} (ray, local)")
