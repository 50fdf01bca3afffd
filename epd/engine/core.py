"""The engine core: the driver loop that feeds idle workers batches and collects their results."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Optional

from epd.config import EngineConfig, Role
from epd.engine.executor import make_executor
from epd.engine.warmup import full_size_requests, missing_batches, staggered, warmup_requests
from epd.lifetime import EventLog
from epd.models.runtime import load_family, resolve_device
from epd.models.tokenizer import load_tokenizer
from epd.request import CANCELLED, INVALID, Request
from epd.run_result import BatchRecord
from epd.stages.admission import check_identity
from epd.stages.pipeline import OutputCallback, Pipeline
from epd.stages.work import BatchFailure, SwitchBatch
from epd.transfer import transfer_class

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        on_output: Optional[OutputCallback] = None,
        allocation=None,  # an AllocationController: re-decides the stage sizes while serving
    ):
        self.config = config
        model, deployment = config.model, config.deployment
        deployment.validate()
        family = load_family(model)
        tokenizer = load_tokenizer(model, {family.image_token_id, *range(4)})
        self.executor = make_executor(config.executor, deployment, model, config.backend)
        frees = transfer_class(self.executor.transfer).frees_on_send  # the backend the workers actually use
        self.pipeline = Pipeline(deployment, family, frees, time.time(), on_output, tokenizer)
        self.pipeline.replaces_lost = deployment.replace_lost_workers and self.executor.can_replace
        self._incoming: queue.Queue[tuple[Request, float]] = queue.Queue()
        self._aborts: queue.Queue[tuple[str, str]] = queue.Queue()
        self._forgets: queue.Queue[str] = queue.Queue()
        self._wake = threading.Event()  # set by add_request: an idle loop starts at once
        self._replacing: set[str] = set()  # lost workers whose replacement was asked for
        self._ready_replacements: dict[str, float] = {}  # replacements up, waiting for the old batches to settle
        self.allocation = allocation
        self.timeseries: list[dict] = []
        self.sample_interval = 0.25
        self._next_sample = 0.0
        self._submitted: dict[int, float] = {}
        self.batches: deque[BatchRecord] = deque(maxlen=100_000)  # the latest batches' timings, for overhead analysis
        self.warmup_s: Optional[float] = None
        self.warmup_batches: dict[tuple[str, str], int] = {}
        if config.backend.warmup:
            try:
                self.warm_up(config.backend.timeout_s)
            except BaseException:
                self.close()  # no workers left behind
                raise

    def warm_up(
        self, timeout_s: float = 600.0, max_waves: int = 4, full_size: Optional[bool] = None, mixed_steps: Optional[bool] = None
    ) -> float:
        """Run warm-up requests until every instance has run a batch of each kind its roles serve (several
        waves where routing left one out), then start a fresh run. Raises if one fails. Both default to
        on for GPU workers, where a kernel's or library's first call at a new shape is what costs (on CPU
        nothing compiles, and they would only lengthen every start): `full_size` adds requests that fill
        an encode batch and a prefill step; `mixed_steps` has instances that mix prefill into decode
        steps run one. What ran is kept in `warmup_batches`: (instance, kind) -> largest size."""
        started = time.time()
        deadline = started + timeout_s
        family = self.pipeline.family
        insts = self.pipeline.instances
        roles = {iid: inst.roles for iid, inst in insts.items()}
        chunked_mixed = self.pipeline.policy.chunked and self.config.deployment.prefill_decode_steps == "mixed"
        on_gpu = resolve_device(self.config.model.device).type == "cuda"
        full_size = on_gpu if full_size is None else full_size
        mixed_steps = on_gpu if mixed_steps is None else mixed_steps
        mixes = chunked_mixed and mixed_steps
        mixed = frozenset(iid for iid, inst in insts.items() if mixes and inst.has(Role.PREFILL) and inst.has(Role.DECODE))
        on_output, allocation = self.pipeline.on_output, self.allocation
        self.pipeline.on_output, self.allocation = None, None  # no client hears of them; no stage resizing on them
        ran: dict[tuple[str, str], int] = {}
        try:
            for wave in range(max_waves):
                requests = warmup_requests(family, 2 * len(insts) + 2, wave)  # halves of two or more (`staggered`)
                # where instances mix prefill into decode steps, the second half joins the first's decodes
                first, second = staggered(requests) if mixed else (requests, [])
                if full_size and wave == 0:
                    first += self._full_size_requests(family)
                for req in first:
                    self.add_request(req)
                while mixed and not any(b.kind in ("DecodeBatch", "MixedBatch") for b in self.batches) and self.has_work():
                    if time.time() > deadline:
                        raise TimeoutError(f"the engine's warm-up did not reach a decode step within {timeout_s}s")
                    self.step()  # the second half arrives while the first decodes: mixed steps
                for req in second:
                    self.add_request(req)
                self.run_until_idle(max(1.0, deadline - time.time()))
                for req in first + second:
                    out = self.pipeline.outputs[req.request_id]
                    if out.finish_reason == "abort" and out.error_kind != INVALID:  # too big for this deployment is no failure
                        raise RuntimeError(f"the engine failed its warm-up: request {req.request_id}: {out.abort_reason}")
                for b in self.batches:
                    ran[(b.instance, b.kind)] = max(ran.get((b.instance, b.kind), 0), b.size)
                self.batches.clear()
                if not missing_batches(roles, set(ran), mixed):
                    break
        finally:
            self.pipeline.on_output, self.allocation = on_output, allocation
        self.warmup_batches = ran
        self.new_run()
        self.warmup_s = time.time() - started
        return self.warmup_s

    def _full_size_requests(self, family) -> list[Request]:
        """Enough one-image requests for the largest encode batch an instance takes, with prompts that
        together pass the largest prefill step's token budget."""
        pools = [inst.cfg for inst in self.pipeline.instances.values()]
        images = max((p.max_images_per_batch for p in pools), default=1)
        tokens = max((p.max_prefill_tokens for p in pools), default=0)
        prompt = max(8, min(512, tokens // max(1, images)))
        return full_size_requests(family, images, prompt)

    @property
    def origin(self) -> float:
        return self.pipeline.origin

    def reset_clock(self) -> None:
        """Start the run's clock now (after workers have loaded)."""
        self.pipeline.origin = time.time()
        self.timeseries.clear()
        self.batches.clear()

    def new_run(self) -> None:
        """Forget finished requests and start a fresh clock: the next workload runs on the same workers."""
        if not self.pipeline.idle() or not self._incoming.empty():
            raise RuntimeError(f"new_run while {self.pipeline.num_active} requests are active")
        self.pipeline.events = EventLog()
        self.pipeline.states.clear()
        self.pipeline.outputs.clear()
        if self.allocation is not None:
            self.allocation.estimator.history.clear()
        self.reset_clock()

    def add_request(self, req: Request) -> None:
        """Thread-safe: the request is admitted at the next step (a request that is not a Request with
        a non-empty string id raises here; every other defect aborts it with a reason at admission)."""
        check_identity(req)
        self._incoming.put((req, time.time()))
        self._wake.set()

    def abort_request(self, request_id: str, reason: str = "cancelled by the client") -> None:
        """Thread-safe: the request is aborted (its blocks freed) at the next step."""
        self._aborts.put((request_id, reason))
        self._wake.set()

    def forget_request(self, request_id: str) -> None:
        """Thread-safe: an ended request's state and output are dropped at the next step (after any
        abort asked for before), so a long-running server holds only the requests in flight."""
        self._forgets.put(request_id)
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Requests added and not yet finished (including those not admitted yet)."""
        return self._incoming.qsize() + self.pipeline.num_active

    def has_work(self) -> bool:
        return not self._incoming.empty() or not self.pipeline.idle()

    def step(self, timeout: float = 0.02) -> None:
        while True:
            try:
                req, submitted = self._incoming.get_nowait()
            except queue.Empty:
                break
            try:
                self.pipeline.add_request(req, submitted)
            except ValueError as exc:  # a duplicate id: the one already known keeps it, this one is dropped
                log.error("request refused: %s", exc)
        while True:
            try:
                rid, reason = self._aborts.get_nowait()
            except queue.Empty:
                break
            if rid in self.pipeline.states:
                self.pipeline.abort(self.pipeline.states[rid], reason, time.time(), CANCELLED)
        while True:
            try:
                rid = self._forgets.get_nowait()
            except queue.Empty:
                break
            state = self.pipeline.states.get(rid)
            if state is not None and state.done:
                self.pipeline.forget(rid)
        for iid, reason in self.executor.lost_workers().items():  # found dead while it had nothing to run
            self.pipeline.lose_instance(self.pipeline.instances[iid], reason, time.time())
        self._replace_lost_workers()
        self._dispatch()
        if not self.executor.inflight:
            self._wake.wait(timeout)  # nothing running: sleep until a request comes
            self._wake.clear()
            if self.allocation is not None:
                self.allocation.tick(self.pipeline, time.time())
            return
        for iid, batch, result in self.executor.wait(timeout):
            if isinstance(batch, SwitchBatch) and not isinstance(result, BatchFailure):
                self.executor.refresh_transfers(iid)  # peers learn its new caches before it serves
            submitted = self._submitted.pop(id(batch), None)
            if not isinstance(result, BatchFailure) and submitted is not None:
                self.batches.append(BatchRecord.of(iid, batch, submitted, result))
            self.pipeline.complete(self.pipeline.instances[iid], batch, result)
            self._dispatch()  # at once: the worker that just finished may have nothing queued
        now = time.time()
        if now >= self._next_sample:
            self._next_sample = now + self.sample_interval
            self.timeseries.extend(self.pipeline.load_snapshot(now))
        if self.allocation is not None:
            self.allocation.tick(self.pipeline, now)

    def _replace_lost_workers(self) -> None:
        """Start a replacement for each newly lost worker; let each replacement that came up rejoin once
        its dead predecessor's batches have all been accounted for."""
        if not self.pipeline.replaces_lost or not (self.executor.lost or self._replacing):
            return  # the common case, every loop: nothing lost
        for iid, inst in self.pipeline.instances.items():
            if inst.failed and iid in self.executor.lost and iid not in self._replacing | self.executor.given_up:
                self._replacing.add(iid)
                self.executor.replace(iid, inst.roles, inst.cfg)
        for iid in self.executor.given_up & self._replacing:
            self._replacing.discard(iid)
            self.pipeline.replacement_abandoned(self.pipeline.instances[iid])
        self._ready_replacements.update(self.executor.rejoined())
        for iid, took in list(self._ready_replacements.items()):
            inst = self.pipeline.instances[iid]
            if not inst.inflight:
                del self._ready_replacements[iid]
                self._replacing.discard(iid)
                self.pipeline.rejoin_instance(inst, time.time(), took)

    def _dispatch(self) -> None:
        for inst in self.pipeline.instances.values():
            while True:
                self._note_prepared()  # before each dispatch: the in-process executor prepares at submit
                batch = self.pipeline.dispatch(inst)
                if batch is None:
                    break
                self._submitted[id(batch)] = time.time()
                self.executor.submit(inst.id, batch)

    def _note_prepared(self) -> None:
        """Encode batches whose images became ready join their workers' queues in the pipeline's view."""
        for iid, batch in self.executor.take_prepared():
            self.pipeline.prepared(self.pipeline.instances[iid], batch)

    def run_until_idle(self, timeout_s: float = 600.0, on_finished=None) -> None:
        """Step until every request has ended; `on_finished(n)` is told as n more end."""
        deadline = time.time() + timeout_s
        active = self.in_flight
        while self.has_work() or any(i.busy for i in self.pipeline.instances.values()):
            if time.time() > deadline:
                raise TimeoutError(f"engine did not drain within {timeout_s}s: {self.pipeline.num_active} requests active")
            self.step()
            if on_finished is not None and self.in_flight < active:
                on_finished(active - self.in_flight)
                active = self.in_flight

    def drain_check(self) -> dict[str, int]:
        """Every block free on the driver, every sequence forgotten on the workers."""
        self.pipeline.assert_drained()
        releases = {iid: inst.take_releases() for iid, inst in self.pipeline.instances.items() if not inst.failed}
        held = {iid: self.executor.call_one(iid, "release", ids) for iid, ids in releases.items()}
        left = {iid: n for iid, n in held.items() if n}
        if left:
            raise AssertionError(f"workers still hold sequences after the run: {left}")
        return held

    def start_phases(self) -> dict[str, float]:
        """The driver's view of start-up before the warm-up (each worker's own phases: `worker_info`)."""
        return {k: round(v, 3) for k, v in self.executor.startup_s.items()}

    def worker_info(self) -> list[dict]:
        return list(self.executor.call("info").values())

    def close(self) -> None:
        if self.allocation is not None:
            self.allocation.close()
        self.executor.shutdown()
