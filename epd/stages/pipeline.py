"""The request flow E -> P -> D over stage instances, independent of what runs the batches.

The real engine feeds it results from workers; the simulator feeds it results from latency
models. Either way the same admission checks, routing, schedulers and block accounting run,
and the same lifetime events come out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from epd.config import POOL_ROLES, ROLES, DeploymentConfig, Role
from epd.images import ImageError
from epd.lifetime import EventLog
from epd.lifetime import LifetimeEvent as Ev
from epd.request import Request, RequestOutput, TokenLogprob
from epd.stages.admission import AdmissionError, check_identity, prepare
from epd.stages.handoff import HandOff
from epd.stages.instance import Instance
from epd.stages.model_view import ModelView
from epd.stages.preemption import Preemption
from epd.stages.results import Results
from epd.stages.router import Router
from epd.stages.routes import Routes
from epd.stages.schedulers import Policy, select_decode, select_encode, select_prefill, take_prefill
from epd.stages.state import RequestState
from epd.stages.switching import RoleSwitching
from epd.stages.work import (
    Batch,
    BatchFailure,
    DecodeBatch,
    DecodeResult,
    EncodeResult,
    MixedBatch,
    MixedResult,
    PrefillBatch,
    PrefillResult,
    Result,
    SwitchBatch,
    prepared_first,
)

# (request id, new tokens, finish reason or None, their logprobs when the request asked for them)
OutputCallback = Callable[[str, list[int], Optional[str], Optional[list[TokenLogprob]]], None]


class Pipeline(Routes, HandOff, Results, Preemption, RoleSwitching):
    """The request flow: admission, scheduling, results; routing, hand-offs, endings, preemption and
    role switching live in the parts it is made of (routes, handoff, results, preemption, switching)."""

    def __init__(
        self,
        deployment: DeploymentConfig,
        family: ModelView,
        frees_on_send: bool = True,
        time_origin: float = 0.0,
        on_output: Optional[OutputCallback] = None,
        tokenizer=None,
    ):
        deployment.validate()
        self.deployment = deployment
        self.family = family
        self.text = family.text_config()
        self.kv_bytes_per_token = family.kv_bytes_per_token()  # for the bytes of transfer events
        self.mm_bytes_per_token = family.mm_bytes_per_token()
        self.frees_on_send = frees_on_send
        self.max_pending = deployment.max_pending_transfers
        self.depth = 2 if deployment.async_scheduling else 1  # batches an instance may have in flight
        self.policy = Policy(deployment.chunked_prefill, deployment.kv_allocation == "reserve", family.image_token_id)
        self.now = time_origin  # the latest time the pipeline was told of (arrivals, results)
        self.origin = time_origin
        self.on_output = on_output
        self.tokenizer = tokenizer
        self.router = Router(deployment.routing)
        self.instances: dict[str, Instance] = {}
        self.by_role: dict[Role, list[Instance]] = {r: [] for r in ROLES}
        for pool_name, pool in deployment.pools().items():
            roles = POOL_ROLES[pool_name]
            for k in range(pool.instances):
                inst = Instance(f"{pool_name}-{k}", pool_name, roles, pool, deployment.prefix_caching, self.text.is_hybrid)
                self.instances[inst.id] = inst
                for r in roles:
                    self.by_role[r].append(inst)
        self.events = EventLog()
        self.states: dict[str, RequestState] = {}
        self.outputs: dict[str, RequestOutput] = {}
        self.replaces_lost = False  # whether the engine replaces lost workers (set by the engine; the simulator loses none)
        self.coming: set[str] = set()  # lost instances whose replacement is starting
        self.parked: list[tuple[RequestState, Role, Callable[[], None]]] = []  # waiting for a stage to come back

    # ---- bookkeeping -------------------------------------------------------------------
    def _t(self, t: float) -> float:
        return t - self.origin

    def emit(self, t: float, state: RequestState, kind: Ev, instance: Optional[str] = None, **data) -> None:
        self.events.emit(self._t(t), state.rid, kind, instance, **data)

    @property
    def num_active(self) -> int:
        return sum(1 for s in self.states.values() if not s.done)

    def idle(self) -> bool:
        return self.num_active == 0

    def load_snapshot(self, now: float) -> list[dict]:
        """Per-instance load signals at `now`: queue lengths, running sequences, block usage, busy."""
        rows = []
        for inst in self.instances.values():
            rows.append(
                {
                    "time": self._t(now),
                    "instance": inst.id,
                    "encode_queue": len(inst.encode_queue),
                    "prefill_queue": len(inst.prefill_queue),
                    "decode_queue": len(inst.decode_queue),
                    "running": len(inst.running),
                    "outgoing": inst.outgoing,
                    "kv_usage": inst.kv_usage,
                    "mm_usage": inst.mm_usage,
                    "busy": int(inst.busy),
                    "pool": inst.pool,
                    "switching": int(inst.switching_to is not None),
                }
            )
        return rows

    def assert_drained(self) -> None:
        for inst in self.instances.values():
            inst.assert_drained()

    def forget(self, rid: str) -> None:
        """Drop a finished request's state and output (its events stay in the log). A request whose
        senders' blocks a batch in flight still reads is dropped once that batch completes."""
        state = self.states.get(rid)
        if state is None:
            return
        if not state.done:
            raise ValueError(f"request {rid!r} is still active")
        self.outputs.pop(rid, None)
        if state.pulling:
            state.forgotten = True
        else:
            del self.states[rid]

    # ---- admission ---------------------------------------------------------------------
    def add_request(self, req: Request, now: float) -> None:
        self.now = max(self.now, now)
        check_identity(req)
        if req.request_id in self.states:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        state = RequestState(req, [], [])
        self.states[req.request_id] = state
        self.emit(now, state, Ev.ISSUED, num_images=len(req.images) if isinstance(req.images, (tuple, list)) else 0)
        try:
            prepare(state, self.family, self.text, self.tokenizer, self.by_role, self.policy.chunked)
        except (AdmissionError, ImageError, ValueError) as exc:
            self.abort(state, str(exc), now)
            return
        except Exception as exc:  # a defect admission did not foresee: this request's, not the engine's
            self.abort(state, f"request could not be admitted: {type(exc).__name__}: {exc}", now)
            return
        if state.media:
            self._route_encode(state)
        else:
            self._route_prefill(state)

    # ---- scheduling --------------------------------------------------------------------
    def dispatch(self, inst: Instance) -> Optional[Batch]:
        """The batch to send `inst`'s worker now, if it may take one: with async scheduling while one
        batch runs, so the next is queued at the worker when the current one ends. Every dispatched
        batch comes back through `complete`."""
        if inst.inflight and inst.switching_to is not None:
            return None
        # An encode batch whose images are prepared on the host takes no place in the worker's queue until
        # they are ready (`prepared`): up to `depth` such batches beside `depth` batches for the device (and
        # 2 x depth in all: a prepared batch joins a full queue rather than wait for a place in it).
        may_prepare = len(inst.preparing) < self.depth and inst.inflight < 2 * self.depth
        if inst.inflight - len(inst.preparing) >= self.depth:
            batch = self._encode_batch(inst) if may_prepare else None  # the device's queue is full: host work may start
        else:
            batch = self.next_batch(inst, may_prepare)
        if batch is not None:
            inst.inflight += 1
            if prepared_first(batch):
                inst.preparing.add(id(batch))
        return batch

    def prepared(self, inst: Instance, batch: Batch) -> None:
        """An encode batch's images are ready on its worker: it joins the worker's batch queue now."""
        inst.preparing.discard(id(batch))

    def _encode_batch(self, inst: Instance) -> Optional[Batch]:
        if inst.failed or inst.switching_to is not None or not inst.has(Role.ENCODE):
            return None
        return select_encode(inst, self.max_pending)

    def next_batch(self, inst: Instance, may_prepare: bool = True) -> Optional[Batch]:
        """Encode first, then prefill, then decode: the order an aggregated worker serves them (encode only
        while `may_prepare`: fewer than `depth` of its encode batches wait for their images' host work)."""
        if inst.failed:
            return None
        if inst.switching_to is not None:
            return self._drain_or_switch(inst)
        if inst.has(Role.ENCODE) and may_prepare:
            batch = select_encode(inst, self.max_pending)
            if batch:
                return batch
        if inst.has(Role.PREFILL) and inst.has(Role.DECODE) and self.policy.chunked:
            return self._mixed_step(inst) if self.deployment.prefill_decode_steps == "mixed" else self._alternate_step(inst)
        if inst.has(Role.PREFILL):
            batch = select_prefill(inst, self.max_pending, self.pulled, self.policy)
            if batch:
                return batch
        if inst.has(Role.DECODE):
            return select_decode(inst, self.pulled, self.policy, self.preempt)
        return None

    def _mixed_step(self, inst: Instance) -> Optional[Batch]:
        """Decodes first, then prefill chunks in what is left of the step's token budget."""
        decode = select_decode(inst, self.pulled, self.policy, self.preempt)
        # At least a token of prefill per step: a decode batch as large as the budget must not starve it.
        budget = max(1, inst.cfg.max_prefill_tokens - (len(decode.step) if decode else 0))
        chunks = take_prefill(inst, budget, self.pulled, self.policy)
        if decode is None:
            return PrefillBatch(chunks, inst.take_releases()) if chunks else None
        if not chunks:
            return decode
        return MixedBatch(decode, PrefillBatch(chunks))

    def _alternate_step(self, inst: Instance) -> Optional[Batch]:
        """A prefill step, then a decode step, while both have work (each its own forward)."""
        kinds = ("decode", "prefill") if inst.prefilled_last else ("prefill", "decode")
        for kind in kinds:
            if kind == "prefill":
                batch = select_prefill(inst, self.max_pending, self.pulled, self.policy)
            else:
                batch = select_decode(inst, self.pulled, self.policy, self.preempt)
            if batch is not None:
                inst.prefilled_last = kind == "prefill"
                return batch
        return None

    def _steps_back(self, inst: Instance, batch: DecodeBatch) -> set[str]:
        """Count a decode batch's steps back in; the ids whose step was sent before they were preempted
        (their tokens are dropped)."""
        stale = set()
        for rid in batch.step:
            if (state := self.states.get(rid)) is None:
                continue
            if state.stale_steps.get(inst.id):
                state.stale_steps[inst.id] -= 1
                stale.add(rid)
            else:
                state.steps_inflight -= 1
        return stale

    def complete(self, inst: Instance, batch: Batch, result: Result | BatchFailure) -> None:
        self.now = max(self.now, result.time if isinstance(result, BatchFailure) else result.span[1])
        inst.inflight -= 1
        inst.preparing.discard(id(batch))  # a batch that failed before its images were ready
        decode = batch.decode if isinstance(batch, MixedBatch) else batch if isinstance(batch, DecodeBatch) else None
        stale = self._steps_back(inst, decode) if decode is not None else set()
        if isinstance(batch, SwitchBatch):
            self._switched(inst, batch, result)
            return
        redo = self._pull_done(batch, inst)  # first: a prefill result below may make this instance a sender
        stale |= redo  # started over: this batch's tokens for them are dropped (prefill: their attempt moved on)
        if isinstance(result, BatchFailure):
            self._fail_batch(inst, batch, result, redo)
        elif isinstance(result, EncodeResult):
            self._encoded(inst, batch, result)
        elif isinstance(result, PrefillResult):
            self._prefilled(inst, batch, result)
        elif isinstance(result, DecodeResult):
            self._decoded(inst, result, stale, batch)
        elif isinstance(result, MixedResult):
            self._decoded(inst, result.decode, stale, batch.decode)
            self._prefilled(inst, batch.prefill, result.prefill)
