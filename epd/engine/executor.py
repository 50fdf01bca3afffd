"""Where batches run: Ray actors reserved with one placement group, or workers in this process."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

from epd.config import POOL_ROLES, BackendConfig, DeploymentConfig, ModelConfig, PoolConfig
from epd.distributed import CommSpec, PairRendezvous, free_port
from epd.engine.deadlines import BatchDeadlines
from epd.engine.ordering import Tickets
from epd.stages.work import Batch, BatchFailure, Result, prepared_first, pulled_handles
from epd.transfer import Endpoint, TransferHandle, transfer_class

log = logging.getLogger(__name__)
Done = tuple[str, Batch, "Result | BatchFailure"]


def _reason(exc: BaseException) -> str:
    """A worker's failure in one line: the exception's type and first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _worker_specs(deployment: DeploymentConfig):
    for pool_name, pool in deployment.pools().items():
        for k in range(pool.instances):
            yield f"{pool_name}-{k}", POOL_ROLES[pool_name], pool


class LocalExecutor:
    """All workers in this process, batches run at submit time (benchmarks, single-GPU runs)."""

    transfer = "local"

    def __init__(self, deployment: DeploymentConfig, model: ModelConfig):
        from epd.engine.worker import Worker

        t0 = time.time()
        self.workers = {iid: Worker(iid, roles, model, pool, self.transfer) for iid, roles, pool in _worker_specs(deployment)}
        self.startup_s = {"workers_built": time.time() - t0}
        self._done: list[Done] = []
        self._prepared: list[tuple[str, Batch]] = []
        self.lost: set[str] = set()  # never any: see lost_workers

    def submit(self, iid: str, batch: Batch) -> None:
        try:
            self.workers[iid].prepare(batch)
            if prepared_first(batch):
                self._prepared.append((iid, batch))
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

    def take_prepared(self) -> list[tuple[str, Batch]]:
        """Encode batches whose images became ready since the last call (here: at submit)."""
        out, self._prepared = self._prepared, []
        return out

    def lost_workers(self, interval_s: float = 0.5) -> dict[str, str]:
        """In one process a worker cannot die alone."""
        return {}

    def refresh_transfers(self, iid: str) -> None:
        """In one process the local backend finds every worker's current caches by itself."""

    can_replace = False  # in-process workers live and die with the driver
    given_up: frozenset[str] = frozenset()

    def replace(self, iid: str, roles: tuple[str, ...], pool: PoolConfig) -> None:
        raise RuntimeError("in-process workers are not replaced")

    def rejoined(self) -> dict[str, float]:
        return {}

    def call(self, method: str, *args) -> dict[str, Any]:
        return {iid: getattr(w, method)(*args) for iid, w in self.workers.items()}

    def call_one(self, iid: str, method: str, *args) -> Any:
        return getattr(self.workers[iid], method)(*args)

    def shutdown(self) -> None:
        for w in self.workers.values():
            w.close()
        self.workers.clear()


@dataclass(frozen=True)
class _Proc:
    """One worker process: rank `rank` of instance `iid` (tensor-parallel instances have several)."""

    iid: str
    roles: tuple[str, ...]
    pool: PoolConfig
    endpoint: Endpoint


def _processes(deployment: DeploymentConfig) -> list[_Proc]:
    procs: list[_Proc] = []
    for iid, roles, pool in _worker_specs(deployment):
        for rank in range(pool.tp):
            procs.append(_Proc(iid, roles, pool, Endpoint(iid, rank, pool.tp, len(procs))))
    return procs


def _group_backend(procs: list[_Proc]) -> str:
    return "nccl" if any(p.pool.num_gpus > 0 for p in procs) else "gloo"


def _comm_specs(procs: list[_Proc], host: str) -> dict[str, CommSpec]:
    """Each tensor-parallel instance's world: its own ranks, on a rendezvous of its own."""
    tp_groups: dict[str, list[int]] = {}
    for p in procs:
        if p.endpoint.tp > 1:
            tp_groups.setdefault(p.iid, []).append(p.endpoint.global_rank)
    return {iid: _instance_world(host, ranks, _group_backend(procs)) for iid, ranks in tp_groups.items()}


def _instance_world(host: str, global_ranks: list[int], backend: str) -> CommSpec:
    """A world of one tensor-parallel instance's ranks, on a fresh rendezvous port."""
    tp = len(global_ranks)
    return CommSpec(host, free_port(), tp, (tuple(range(tp)),), backend, first_rank=min(global_ranks))


def ensure_ray(backend: BackendConfig, deployments: list[DeploymentConfig]) -> bool:
    """Connect to `backend.address` (or RAY_ADDRESS), or start a local cluster with CPUs for the largest of `deployments`
    (one per worker process, plus the driver). Returns whether this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = backend.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        kwargs: dict[str, Any] = {"address": address}
    else:
        need = max(int(sum(p.pool.num_cpus for p in _processes(d))) for d in deployments) + 1
        # "local": a cluster of our own, never one that happens to run on this host (a `ray start`, another
        # process's test cluster), which Ray would join when asked for no address
        kwargs = {"address": "local", "num_cpus": max(need, backend.num_cpus or 0, os.cpu_count() or 1)}
    # Ray's start-up notices (token set-up, "Started a local Ray instance") stay out of the terminal.
    ray.init(log_to_driver=False, include_dashboard=False, logging_level=logging.ERROR, **kwargs)
    return True


class RayExecutor:
    transfer = "object_store"

    def __init__(self, deployment: DeploymentConfig, model: ModelConfig, backend: BackendConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from epd.engine.worker import Worker

        self.ray = ray
        self.transfer = deployment.transfer
        self.needs_push = transfer_class(self.transfer).needs_push
        procs = _processes(deployment)
        t0 = time.time()
        self._own_ray = ensure_ray(backend, [deployment])
        t1 = time.time()
        # One bundle per process, reserved at once: a deployment gets all of its GPUs or none.
        bundles = [{"CPU": p.pool.num_cpus, **({"GPU": p.pool.num_gpus} if p.pool.num_gpus else {})} for p in procs]
        self.pg = placement_group(bundles, strategy=backend.placement)
        if not self.pg.wait(timeout_seconds=120):
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(f"cannot reserve {bundles} on the Ray cluster: {ray.cluster_resources()}")
        host = ray.util.get_node_ip_address()
        self._comms = _comm_specs(procs, host)
        self._stores: dict[int, Any] = {}  # rendezvous port -> the store the driver hosts for that world
        for spec in self._comms.values():
            self._host_store(spec.host, spec.port)
        self._pairs = PairRendezvous(host, free_port(), _group_backend(procs)) if self.needs_push else None
        if self._pairs is not None:
            self._host_store(self._pairs.host, self._pairs.port)
        # A transfer thread beside the batch thread: pushes (NCCL) go on while the worker computes.
        # Prep threads: an encode batch's `prepare` returns once its images are ready (it then joins the
        # worker's batch order), one a batch the pipeline lets prepare at once, and one to spare.
        # Three threads for batches and calls: the next batch is taken in while one runs (`execute`'s tickets).
        prep = {"prep": 3}
        self._remote_cls = ray.remote(max_concurrency=3, concurrency_groups={"transfer": max(2, len(procs)), **prep})(Worker)
        self._strategy = PlacementGroupSchedulingStrategy
        self._procs, self._model = procs, model
        self._starting: dict[str, tuple] = {}  # replacements under way: actors, pings, start time, (roles, pool, attempt)
        self._retries: dict[str, tuple[float, tuple]] = {}  # replacements to try again: when, (roles, pool, attempt)
        self.given_up: set[str] = set()  # instances no replacement will come for
        self.actors: dict[str, list[Any]] = {}
        for idx, p in enumerate(procs):
            self.actors.setdefault(p.iid, []).append(self._start(idx, p.roles, p.pool))
        all_actors = [a for ranks in self.actors.values() for a in ranks]
        try:
            t2 = time.time()
            ray.get([a.ping.remote() for a in all_actors])  # surface construction errors now
            t3 = time.time()
            self._exports = dict(ray.get([a.transfer_export.remote() for a in all_actors]))
            ray.get([a.transfer_connect.remote(self._exports) for a in all_actors])
        except Exception:
            self.shutdown()
            raise
        # The driver's view of start-up (each worker's own phases are in its `info`).
        self.startup_s = {"ray": t1 - t0, "placement": t2 - t1, "workers_built": t3 - t2, "transfers_connected": time.time() - t3}
        self._inflight: dict[Any, tuple[str, Batch, list[Any]]] = {}
        # Encode batches whose images are being prepared, not yet in their worker's batch order:
        # the first rank's `prepare` reply -> (instance, batch, its object ref, the ranks, the others' replies).
        self._preparing: dict[Any, tuple[str, Batch, Any, list[Any], list[Any]]] = {}
        self._prepared: list[tuple[str, Batch]] = []
        self._failed_early: list[Done] = []  # batches whose worker died while their images were prepared
        self._pushes: list[Any] = []
        self.lost: set[str] = set()  # instances whose worker died
        self._pings: dict[Any, str] = {}  # liveness pings in flight -> instance
        self._next_ping = 0.0
        self._tickets = Tickets()  # per instance: its batches' order
        self._push_tickets = Tickets()  # per (sender, receiver): the order of pushes between them
        self.deadlines = BatchDeadlines(backend.worker_deadline_factor, backend.worker_deadline_floor_s)

    def _start(self, idx: int, roles: tuple[str, ...], pool: PoolConfig) -> Any:
        """The worker process of `_procs[idx]` in its placement-group bundle (its GPU, its cores)."""
        p = self._procs[idx]
        gpu = pool.num_gpus > 0
        env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if gpu else {}
        return self._remote_cls.options(
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            scheduling_strategy=self._strategy(self.pg, placement_group_bundle_index=idx),
            runtime_env={"env_vars": env} if env else None,
        ).remote(
            p.iid,
            roles,
            self._model,
            pool,
            self.transfer,
            max(1, int(pool.num_cpus)),
            p.endpoint,
            self._comms.get(p.iid),
            gpu,
            True,
            self._pairs,
        )

    def _host_store(self, host: str, port: int) -> None:
        """A rendezvous, hosted by the driver so that workers on any node reach it."""
        import torch.distributed as dist

        from epd.distributed import TIMEOUT

        if port not in self._stores:
            self._stores[port] = dist.TCPStore(host, port, None, is_master=True, timeout=TIMEOUT, wait_for_workers=False)

    # A lost worker is started again: a tensor-parallel instance in a fresh world of its own, and with
    # push-based transfers every worker makes new pair groups with the new incarnation.
    can_replace = True

    def replace(self, iid: str, roles: tuple[str, ...], pool: PoolConfig) -> None:
        """Start a new worker for lost instance `iid` (its current roles and pool) in the dead one's
        bundle; it loads its weights while the others serve, and `rejoined` reports it once it answers
        (or `given_up` names it)."""
        for a in self.actors.get(iid, []):
            self.ray.kill(a, no_restart=True)  # a hung one too, and a dead rank's live siblings: their bundles are needed
        self._launch(iid, roles, pool, attempt=1)

    def _launch(self, iid: str, roles: tuple[str, ...], pool: PoolConfig, attempt: int) -> None:
        if iid in self._comms:  # the instance's ranks meet again in a new world: the old one died with a rank
            old = self._comms[iid]
            self._stores.pop(old.port, None)
            self._comms[iid] = _instance_world(old.host, [old.first_rank + r for r in range(old.world_size)], old.backend)
            self._host_store(self._comms[iid].host, self._comms[iid].port)
        ranks = [self._start(i, roles, pool) for i, p in enumerate(self._procs) if p.iid == iid]
        self._tickets.restart(iid)  # the new worker's batches count from 0
        self._push_tickets.restart_where(lambda key: key[0] == iid)  # and so do its pushes to each receiver
        self.deadlines.forget(iid)
        self._starting[iid] = (ranks, [a.ping.remote() for a in ranks], time.time(), (roles, pool, attempt))

    def rejoined(self) -> dict[str, float]:
        """Replacements that came up since the last call, with seconds from their start to ready; their
        live peers have learnt their caches. One that fails to start (its node gone before Ray re-placed
        its bundle, say) is tried again after 2, 4, 8, 16 s, then given up on (logged)."""
        out: dict[str, float] = {}
        now = time.time()
        for iid, (due, spec) in list(self._retries.items()):
            if now >= due:
                del self._retries[iid]
                self._launch(iid, *spec)
        for iid, (ranks, pings, t0, (roles, pool, attempt)) in list(self._starting.items()):
            if len(self.ray.wait(pings, num_returns=len(pings), timeout=0)[0]) < len(pings):
                continue
            del self._starting[iid]
            try:
                self.ray.get(pings)
                self._exports.update(dict(self.ray.get([a.transfer_export.remote() for a in ranks])))
                live = [a for i, rs in self.actors.items() if i not in self.lost for a in rs] + ranks
                self.ray.get([a.transfer_connect.options(concurrency_group="transfer").remote(self._exports) for a in live])
            except Exception as exc:
                for a in ranks:
                    self.ray.kill(a, no_restart=True)
                if attempt < 5:
                    log.warning("the replacement of worker %s failed to start (try %d): %s", iid, attempt, _reason(exc))
                    self._retries[iid] = (time.time() + 2.0**attempt, (roles, pool, attempt + 1))
                else:
                    log.error("the replacement of worker %s failed to start %d times; given up: %s", iid, attempt, _reason(exc))
                    self.given_up.add(iid)
                continue
            self.actors[iid] = ranks
            self.lost.discard(iid)
            out[iid] = time.time() - t0
        return out

    def submit(self, iid: str, batch: Batch) -> None:
        if self.needs_push:
            self._push_for(iid, batch)
        if prepared_first(batch):  # its host work starts now, beside the batches that run; it is queued once done
            arg = self.ray.put(batch)
            ranks = self.actors[iid]  # the list itself: a replacement gets a new one
            refs = [a.prepare.options(concurrency_group="prep").remote(arg) for a in ranks]
            self._preparing[refs[0]] = (iid, batch, arg, ranks, refs[1:])
            return
        self._execute(iid, batch, batch, self.actors[iid])

    def _execute(self, iid: str, batch: Batch, arg: Any, ranks: list[Any]) -> None:
        ticket = self._tickets.take(iid)
        refs = [a.execute.remote(arg, ticket) for a in ranks]
        self._inflight[refs[0]] = (iid, batch, refs[1:])
        self.deadlines.submitted(iid, time.time())

    def _queue_prepared(self) -> None:
        """Encode batches whose images are ready join their worker's batch order, each instance's in the order
        they were sent: a later batch whose images were ready first waits for the ones before it (it may read
        what they encode: an encoder-cache hit on an image a batch before it is still to encode). One whose
        worker died or was replaced meanwhile fails here, without a ticket: the replacement counts its own."""
        if not self._preparing:
            return
        refs = list(self._preparing)  # in the order sent
        ready = set(self.ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        blocked: set[str] = set()  # instances with a batch sent earlier still being prepared
        for ref in refs:
            iid = self._preparing[ref][0]
            if iid in blocked or ref not in ready:
                blocked.add(iid)
                continue
            iid, batch, arg, ranks, others = self._preparing.pop(ref)
            self._prepared.append((iid, batch))
            try:
                self.ray.get([ref, *others])
            except Exception as exc:
                log.error("worker %s failed while preparing images: %s", iid, exc)
                lost = isinstance(exc, self.ray.exceptions.RayActorError)
                if lost and self.actors.get(iid) is ranks:
                    self.lost.add(iid)
                self._failed_early.append((iid, batch, BatchFailure(_reason(exc), time.time(), worker_lost=lost)))
                continue
            if self.actors.get(iid) is not ranks or iid in self.lost:  # as a batch on a dead worker: its requests start over
                why = f"worker {iid} was lost while its images were prepared"
                self._failed_early.append((iid, batch, BatchFailure(why, time.time(), worker_lost=True)))
                continue
            self._execute(iid, batch, arg, ranks)

    def _preparing_heads(self) -> list[Any]:
        """Per instance, the prepare reply of its earliest batch still being prepared (the one that queues next)."""
        heads: dict[str, Any] = {}
        for ref, entry in self._preparing.items():
            heads.setdefault(entry[0], ref)
        return list(heads.values())

    def take_prepared(self) -> list[tuple[str, Batch]]:
        """Encode batches whose images became ready (or whose worker failed) since the last call."""
        self._queue_prepared()
        out, self._prepared = self._prepared, []
        return out

    def _push_for(self, receiver: str, batch: Batch) -> None:
        """Ask each sender whose blocks this batch pulls to push them, in the order the receiver reads them."""
        by_sender: dict[str, list[TransferHandle]] = {}
        for h in pulled_handles(batch):
            by_sender.setdefault(h.worker, []).append(h)
        for sender, handles in by_sender.items():
            ticket = self._push_tickets.take((sender, receiver))
            for actor in self.actors[sender]:
                self._pushes.append(actor.push.options(concurrency_group="transfer").remote(handles, receiver, ticket))

    def _check_pushes(self) -> None:
        if not self._pushes:
            return
        done, self._pushes = self.ray.wait(self._pushes, num_returns=len(self._pushes), timeout=0)
        for ref in done:
            try:
                self.ray.get(ref)
            except Exception as exc:  # the receiving batch fails too and aborts its requests
                log.error("a transfer push failed: %s", exc)

    @property
    def inflight(self) -> int:
        return len(self._inflight) + len(self._preparing) + len(self._failed_early)

    def wait(self, timeout: float) -> list[Done]:
        """Completed batches, each instance's in the order they were sent: a worker's replies can
        overtake one another (the next batch starts while the last one's reply is on its way), and
        the pipeline must see a sequence's tokens in step order. Also returns when an encode batch's
        images became ready (`take_prepared`)."""
        self._check_pushes()
        self._queue_prepared()
        out: list[Done] = self._failed_early
        self._failed_early = []
        if out or self._prepared or not (self._inflight or self._preparing):
            timeout = 0.0  # something to hand back already: only what has finished too
        heads = self._heads()
        waited = heads + self._preparing_heads()  # a later batch's ready images wait for the one before it
        if not waited:
            return out
        ready, _ = self.ray.wait(waited, num_returns=1, timeout=timeout)
        ready = [r for r in ready if r in self._inflight]
        while ready:
            for ref in ready:
                iid, batch, others = self._inflight.pop(ref)
                more = any(i == iid for i, _, _ in self._inflight.values())
                self.deadlines.replied(iid, type(batch).__name__, time.time(), more)
                try:
                    result: Any = self.ray.get(ref)
                    self.ray.get(others)  # the other tensor-parallel ranks ran the same batch
                except Exception as exc:
                    log.error("worker %s failed: %s", iid, exc)
                    lost = isinstance(exc, self.ray.exceptions.RayActorError) or self._rank_died(others)
                    if lost:
                        self.lost.add(iid)
                    result = BatchFailure(_reason(exc), time.time(), worker_lost=lost)
                out.append((iid, batch, result))
            heads = self._heads()
            ready = self.ray.wait(heads, num_returns=len(heads), timeout=0)[0] if heads else []
        return out

    def _rank_died(self, refs: list[Any]) -> bool:
        """Whether a tensor-parallel sibling's part of a failed batch failed because its process died: a live
        rank's collective fails (gloo) when a peer dies, and that batch is the dead worker's, not its own."""
        if not refs:
            return False
        done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=10)
        for ref in done:
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                return True
            except Exception:
                pass
        return False

    def _heads(self) -> list[Any]:
        """Each instance's oldest batch in flight (dicts keep the order batches were sent in)."""
        heads: dict[str, Any] = {}
        for ref, (iid, _, _) in self._inflight.items():
            heads.setdefault(iid, ref)
        return list(heads.values())

    def lost_workers(self, interval_s: float = 0.5) -> dict[str, str]:
        """Instances whose worker process died since the last call, with the reason: each actor answers
        a ping on its transfer thread (never queued behind a batch) every `interval_s`; between
        those, the driver's loop pays nothing here."""
        now = time.time()
        if now < self._next_ping:
            return {}
        self._next_ping = now + interval_s
        out: dict[str, str] = {}
        if self._pings:
            done, _ = self.ray.wait(list(self._pings), num_returns=len(self._pings), timeout=0)
            for ref in done:
                iid = self._pings.pop(ref)
                try:
                    self.ray.get(ref)
                except self.ray.exceptions.RayActorError as exc:
                    if iid not in self.lost:
                        self.lost.add(iid)
                        out[iid] = _reason(exc)
        out.update(self._hung(now))
        waiting = set(self._pings.values())
        for iid, ranks in self.actors.items():
            if iid not in self.lost and iid not in waiting:
                for a in ranks:
                    self._pings[a.ping.options(concurrency_group="transfer").remote()] = iid
        return out

    def _hung(self, now: float) -> dict[str, str]:
        """Instances whose oldest batch is past its deadline: their workers are killed (their batches
        then fail as a dead worker's do) and reported lost."""
        out, seen = {}, set()
        for iid, batch, _ in list(self._inflight.values()):  # each instance's first: its oldest
            if iid in seen or iid in self.lost:
                continue
            seen.add(iid)
            kind = type(batch).__name__
            late = self.deadlines.overdue(iid, kind, now)
            if late is None:
                continue
            waited, bound = late
            out[iid] = f"no reply to a {kind} for {waited:.1f} s (deadline {bound:.1f} s): taken for hung and killed"
            log.error("worker %s: %s", iid, out[iid])
            self.lost.add(iid)
            for a in self.actors[iid]:
                self.ray.kill(a, no_restart=True)
        return out

    def refresh_transfers(self, iid: str) -> None:
        """`iid` reallocated its caches (a role switch): every worker learns its new export. On the
        transfer threads, so no one waits for a running batch."""
        group = {"concurrency_group": "transfer"}
        self._exports.update(self.ray.get([a.transfer_export.options(**group).remote() for a in self.actors[iid]]))
        everyone = [a for ranks in self.actors.values() for a in ranks]
        self.ray.get([a.transfer_connect.options(**group).remote(self._exports) for a in everyone])

    def call(self, method: str, *args) -> dict[str, Any]:
        refs = {iid: getattr(ranks[0], method).remote(*args) for iid, ranks in self.actors.items() if iid not in self.lost}
        return {iid: self.ray.get(r) for iid, r in refs.items()}

    def call_one(self, iid: str, method: str, *args) -> Any:
        refs = [getattr(a, method).remote(*args) for a in self.actors[iid]]
        return self.ray.get(refs)[0]

    def shutdown(self) -> None:
        actors = [a for ranks in self.actors.values() for a in ranks] + [a for entry in self._starting.values() for a in entry[0]]
        self._starting.clear()
        self._retries.clear()
        if actors:
            try:  # let workers leave their process groups and unmap peers before they die
                self.ray.get([a.close.remote() for a in actors], timeout=30)
            except Exception as exc:
                log.warning("closing workers: %s", exc)
        for a in actors:
            self.ray.kill(a)
        self.actors.clear()
        self.ray.util.remove_placement_group(self.pg)
        self._stores.clear()
        if self._own_ray:
            self.ray.shutdown()


def make_executor(kind: str, deployment: DeploymentConfig, model: ModelConfig, backend: Optional[BackendConfig] = None):
    if kind == "local":
        tp = {n: p.tp for n, p in deployment.pools().items() if p.tp > 1}
        if tp:
            raise ValueError(f"tensor parallelism ({tp}) needs backend=ray: one process per rank")
        try:  # in one process every hand-off is a local block copy, whatever deployment.transfer says
            dataclasses.replace(deployment, transfer=LocalExecutor.transfer).validate()
        except ValueError as exc:
            raise ValueError(f"the in-process executor (backend=local) moves caches by block copies: {exc}") from exc
        return LocalExecutor(deployment, model)
    if kind == "ray":
        return RayExecutor(deployment, model, backend or BackendConfig())
    raise ValueError(f"unknown executor {kind!r} (ray, local)")
