"""The request flow E -> P -> D over stage instances, independent of what runs the batches.

The real engine feeds it results from workers; the simulator feeds it results from latency
models. Either way the same admission checks, routing, schedulers and block accounting run,
and the same lifetime events come out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Optional

from epd.config import POOL_ROLES, ROLES, DeploymentConfig, Role, describe_layout
from epd.images import ImageError
from epd.lifetime import SYSTEM, EventLog
from epd.lifetime import LifetimeEvent as Ev
from epd.request import INTERNAL, INVALID, Request, RequestOutput, TokenLogprob
from epd.stages.admission import AdmissionError, prepare
from epd.stages.instance import EncodeWork, Instance
from epd.stages.model_view import ModelView
from epd.stages.router import Router
from epd.stages.schedulers import select_decode, select_encode, select_prefill
from epd.stages.state import Hold, RequestState
from epd.stages.work import (
    Batch,
    BatchFailure,
    DecodeBatch,
    DecodeResult,
    EncodeBatch,
    EncodeResult,
    MMSource,
    PrefillBatch,
    PrefillResult,
    Result,
    SwitchBatch,
)

# (request id, new tokens, finish reason or None, their logprobs when the request asked for them)
OutputCallback = Callable[[str, list[int], Optional[str], Optional[list[TokenLogprob]]], None]


class Pipeline:
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
        self.origin = time_origin
        self.on_output = on_output
        self.tokenizer = tokenizer
        self.router = Router(deployment.routing)
        self.instances: dict[str, Instance] = {}
        self.by_role: dict[Role, list[Instance]] = {r: [] for r in ROLES}
        for pool_name, pool in deployment.pools().items():
            roles = POOL_ROLES[pool_name]
            for k in range(pool.instances):
                inst = Instance(f"{pool_name}-{k}", pool_name, roles, pool)
                self.instances[inst.id] = inst
                for r in roles:
                    self.by_role[r].append(inst)
        self.events = EventLog()
        self.states: dict[str, RequestState] = {}
        self.outputs: dict[str, RequestOutput] = {}

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
                    "kv_usage": inst.kv.usage if inst.kv else 0.0,
                    "mm_usage": inst.mm.usage if inst.mm else 0.0,
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
        if not isinstance(req, Request) or not isinstance(req.request_id, str) or not req.request_id:
            raise ValueError(f"not a request with a non-empty string id: {req!r}"[:200])
        if req.request_id in self.states:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        state = RequestState(req, [], [])
        self.states[req.request_id] = state
        self.emit(now, state, Ev.ISSUED, num_images=len(req.images) if isinstance(req.images, (tuple, list)) else 0)
        try:
            prepare(state, self.family, self.text, self.tokenizer, self.by_role)
        except (AdmissionError, ImageError, ValueError) as exc:
            self.abort(state, str(exc), now)
            return
        except Exception as exc:  # a defect admission did not foresee: this request's, not the engine's
            self.abort(state, f"request could not be admitted: {type(exc).__name__}: {exc}", now)
            return
        if req.images:
            self._route_encode(state)
        else:
            self._route_prefill(state)

    # ---- routing -----------------------------------------------------------------------
    def _route_encode(self, state: RequestState) -> None:
        encoders = self.by_role[Role.ENCODE]
        n = len(state.req.images)
        targets = self.router.spread(Role.ENCODE, encoders, n) if self.deployment.irp else [self.router.choose(Role.ENCODE, encoders)] * n
        state.images_pending = n
        for i, inst in enumerate(targets):
            inst.encode_queue.append(EncodeWork(state, i))
        if targets[0].has(Role.PREFILL):
            state.prefill_instance = targets[0].id

    def _route_prefill(self, state: RequestState) -> None:
        if state.prefill_instance is None:
            state.prefill_instance = self.router.choose(Role.PREFILL, self.by_role[Role.PREFILL]).id
        self.instances[state.prefill_instance].prefill_queue.append(state)
        self._pull_first_if_switching(state)

    def _route_decode(self, state: RequestState, prefill_inst: Instance) -> None:
        if prefill_inst.has(Role.DECODE):
            state.kv_local = True
            inst = prefill_inst
        else:
            inst = self.router.choose(Role.DECODE, self.by_role[Role.DECODE])
        state.decode_instance = inst.id
        inst.decode_queue.append(state)
        self._pull_first_if_switching(state)

    def pulled(self, state: RequestState) -> None:
        """The receiving stage took a batch that pulls what the senders hold for `state`.

        Backends that copied the data out at send time free the senders now; the others keep the
        senders' blocks until the pulling batch has completed (`_pull_done`).
        """
        if self.frees_on_send:
            self._release_senders(state)
        else:
            state.pulling = True

    def _release_senders(self, state: RequestState) -> None:
        for sender in state.senders:
            self.instances[sender].outgoing -= 1
            if not self.frees_on_send:
                for key in state.keys_of(sender):
                    state.release(key)
        state.senders = []

    def _pull_done(self, batch: Batch) -> None:
        if isinstance(batch, PrefillBatch):
            rids = [it.request_id for it in batch.items]
        elif isinstance(batch, DecodeBatch):
            rids = [n.request_id for n in batch.new]
        else:
            return
        for rid in rids:
            state = self.states.get(rid)
            if state is not None and state.pulling:
                state.pulling = False
                self._release_senders(state)
                if state.forgotten:
                    del self.states[rid]

    # ---- scheduling --------------------------------------------------------------------
    def next_batch(self, inst: Instance) -> Optional[Batch]:
        """Encode first, then prefill, then decode: the order an aggregated worker serves them."""
        if inst.failed:
            return None
        if inst.switching_to is not None:
            return self._drain_or_switch(inst)
        if inst.has(Role.ENCODE):
            batch = select_encode(inst, self.max_pending)
            if batch:
                return batch
        if inst.has(Role.PREFILL):
            batch = select_prefill(inst, self.max_pending, self.pulled)
            if batch:
                return batch
        if inst.has(Role.DECODE):
            return select_decode(inst, self.pulled)
        return None

    def complete(self, inst: Instance, batch: Batch, result: Result | BatchFailure) -> None:
        if isinstance(batch, SwitchBatch):
            self._switched(inst, batch, result)
            return
        self._pull_done(batch)  # first: a prefill result below may make this instance a sender
        if isinstance(result, BatchFailure):
            self._fail_batch(inst, batch, result)
        elif isinstance(result, EncodeResult):
            self._encoded(inst, result)
        elif isinstance(result, PrefillResult):
            self._prefilled(inst, result)
        elif isinstance(result, DecodeResult):
            self._decoded(inst, batch, result)

    def _encoded(self, inst: Instance, result: EncodeResult) -> None:
        b, e = result.span
        for item in result.items:
            state = self.states.get(item.request_id)
            if state is None or state.done:
                continue
            if item.error:
                self.abort(state, item.error, e, item.error_kind)
                continue
            self.emit(b, state, Ev.ENCODE_BEGIN, inst.id, image=item.image_index)
            self.emit(e, state, Ev.ENCODE_END, inst.id, image=item.image_index)
            key = Hold.mm(inst.id, item.image_index)
            blocks = state.holds[key][1]
            state.mm[item.image_index] = MMSource(state.image_tokens[item.image_index], blocks, item.handle)
            if item.handle is not None:
                if inst.id not in state.senders:
                    state.senders.append(inst.id)
                    inst.outgoing += 1
                if self.frees_on_send:
                    state.release(key)
            state.images_pending -= 1
            if state.images_pending == 0:
                self._route_prefill(state)

    def _prefilled(self, inst: Instance, result: PrefillResult) -> None:
        b, e = result.span
        for item in result.items:
            state = self.states.get(item.request_id)
            if state is None or state.done:
                continue
            if item.error:
                self.abort(state, f"prefill on {inst.id} failed: {item.error}", e, INTERNAL)
                continue
            if item.mm_transfer:
                nbytes = sum(state.image_tokens) * self.mm_bytes_per_token
                self.emit(item.mm_transfer[0], state, Ev.MM_TRANSFER_BEGIN, inst.id, bytes=nbytes)
                self.emit(item.mm_transfer[1], state, Ev.MM_TRANSFER_END, inst.id)
            self.emit(b, state, Ev.PREFILL_BEGIN, inst.id, tokens=state.prompt_len)
            self.emit(e, state, Ev.PREFILL_END, inst.id)
            self.emit(e, state, Ev.FIRST_TOKEN, inst.id)
            for i in range(len(state.image_tokens)):  # embeddings consumed
                state.release(Hold.mm(inst.id, i))
            if self._append_token(state, item.first_token, e, inst, item.logprob):
                continue
            if not inst.has(Role.DECODE):
                state.kv_handle = item.kv_handle
                state.senders = [inst.id]
                inst.outgoing += 1
                if self.frees_on_send:
                    state.release(Hold.kv(inst.id))
            self._route_decode(state, inst)

    def _decoded(self, inst: Instance, batch: DecodeBatch, result: DecodeResult) -> None:
        b, e = result.span
        for rid, (tb, te) in result.kv_transfers.items():
            state = self.states.get(rid)
            if state is not None and not state.done:
                self.emit(tb, state, Ev.KV_TRANSFER_BEGIN, inst.id, bytes=state.prompt_len * self.kv_bytes_per_token)
                self.emit(te, state, Ev.KV_TRANSFER_END, inst.id)
        for rid, why in result.errors.items():
            if rid in self.states:
                self.abort(self.states[rid], f"decode on {inst.id} failed: {why}", e, INTERNAL)
        for rid, tok in result.tokens.items():
            state = self.states.get(rid)
            if state is None or state.done:
                continue
            if not state.decode_started:
                state.decode_started = True
                self.emit(b, state, Ev.DECODE_BEGIN, inst.id)
            self._append_token(state, tok, e, inst, result.logprobs.get(rid))

    def _append_token(self, state: RequestState, tok: int, t: float, inst: Instance, logprob: Optional[TokenLogprob] = None) -> bool:
        """Record a token; finish the request if it is done. Returns True when finished."""
        state.output.append(tok)
        if logprob is not None:
            state.logprobs.append(logprob)
        if len(state.output) > 1:
            self.emit(t, state, Ev.TOKEN, inst.id, index=len(state.output) - 1)
        sp = state.req.sampling
        reason = None
        if not sp.ignore_eos and (tok == self.text.eos_token_id or tok in sp.stop_token_ids):
            reason = "stop"
        elif len(state.output) >= sp.max_tokens:
            reason = "length"
        if reason:
            self._finish(state, reason, t, inst)  # the output record exists before anyone hears of the end
        if self.on_output:
            self.on_output(state.rid, [tok], reason, None if logprob is None else [logprob])
        return reason is not None

    # ---- role switching ----------------------------------------------------------------
    def layout(self) -> str:
        """The deployment as it stands, e.g. '1E2P1D' (instances that are switching are left out)."""
        return describe_layout(Counter(i.pool for i in self.instances.values() if i.switching_to is None and not i.failed))

    def active(self, role: str) -> list[Instance]:
        return self.by_role[role]

    @property
    def switching(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.switching_to is not None and not i.failed]

    def begin_switch(self, iid: str, pool: str, now: float) -> None:
        """Take instance `iid` out of its stage (no new work; its queue goes to siblings); once drained
        it is sent a SwitchBatch and joins `pool`. The deployment's single-role pools only."""
        inst = self.instances.get(iid)
        if inst is None:
            raise ValueError(f"no instance {iid!r}; instances: {sorted(self.instances)}")
        single = ROLES  # the single-role pools are named as their roles
        if inst.pool not in single or pool not in single or pool not in self.deployment.pools():
            raise ValueError(
                f"role switching moves workers between the deployment's encode/prefill/decode pools, not {inst.pool} -> {pool}"
            )
        if pool == inst.pool:
            raise ValueError(f"instance {iid} is already in {pool}")
        if inst.switching_to is not None or inst.failed:
            raise ValueError(f"instance {iid} is switching already (or out of service)")
        if inst.cfg.tp != 1 or self.deployment.pools()[pool].tp != 1:
            raise ValueError("role switching needs tp: 1 pools")
        for role in inst.roles:
            if len(self.by_role[role]) <= 1:
                raise ValueError(f"switching {iid} would leave no {role} worker")
        for role in inst.roles:
            self.by_role[role].remove(inst)
        inst.switching_to, inst.switch_started = pool, now
        self.events.emit(self._t(now), SYSTEM, Ev.ROLE_SWITCH_BEGIN, iid, from_pool=inst.pool, to_pool=pool)
        # Hand queued work (nothing of it holds blocks here yet) to siblings; running decodes finish here.
        while inst.encode_queue:
            work = inst.encode_queue.popleft()
            if not work.state.done:
                self.router.choose(Role.ENCODE, self.by_role[Role.ENCODE]).encode_queue.append(work)
        while inst.prefill_queue:
            state = inst.prefill_queue.popleft()
            if not state.done:
                state.prefill_instance = None
                self._route_prefill(state)
        while inst.decode_queue:
            state = inst.decode_queue.popleft()
            if not state.done:
                other = self.router.choose(Role.DECODE, self.by_role[Role.DECODE])
                state.decode_instance = other.id
                other.decode_queue.append(state)
        self._pull_first(iid)

    def _pull_first(self, iid: str) -> None:
        """Requests holding what switching worker `iid` sent move to the front of the queues that
        will pull it: the worker may change role only once all of it has been pulled, and behind a
        bottleneck stage's whole queue that drain would take as long as the queue."""
        for other in self.instances.values():
            for queue in (other.prefill_queue, other.decode_queue):
                first = [s for s in queue if iid in s.senders]
                if first and len(first) < len(queue):
                    rest = [s for s in queue if iid not in s.senders]
                    queue.clear()
                    queue.extend(first + rest)

    def _pull_first_if_switching(self, state: RequestState) -> None:
        for sender in state.senders:
            if self.instances[sender].switching_to is not None:
                self._pull_first(sender)

    def _drain_or_switch(self, inst: Instance) -> Optional[Batch]:
        if inst.has(Role.DECODE) and inst.running:
            return select_decode(inst, self.pulled)
        if inst.drained():
            target = inst.switching_to
            return SwitchBatch(POOL_ROLES[target], self.deployment.pools()[target], inst.take_releases())
        return None

    def _switched(self, inst: Instance, batch: SwitchBatch, result: Result | BatchFailure) -> None:
        old, target = inst.pool, inst.switching_to
        if isinstance(result, BatchFailure):
            inst.failed = result.reason  # out of service; the others keep serving
            self.events.emit(self._t(result.time), SYSTEM, Ev.ROLE_SWITCH_END, inst.id, from_pool=old, to_pool=target, failed=result.reason)
            return
        b, e = result.span
        inst.configure(target, batch.roles, batch.pool)
        inst.switching_to = None
        for role in inst.roles:
            self.by_role[role].append(inst)
        self.events.emit(
            self._t(e),
            SYSTEM,
            Ev.ROLE_SWITCH_END,
            inst.id,
            from_pool=old,
            to_pool=target,
            duration=e - inst.switch_started,
            reload=e - b,
            layout=self.layout(),
            weights=result.weights_loaded,
        )

    # ---- endings -----------------------------------------------------------------------
    def _finish(self, state: RequestState, reason: str, t: float, inst: Instance) -> None:
        state.done = True
        self.emit(t, state, Ev.FINISHED, inst.id, num_output_tokens=len(state.output), finish_reason=reason)
        self._cleanup(state)
        text = self.tokenizer.decode(state.output) if self.tokenizer is not None else None
        logprobs = list(state.logprobs) if state.req.sampling.logprobs is not None else None
        self.outputs[state.rid] = RequestOutput(state.rid, list(state.output), text, reason, None, state.prompt_len, logprobs)

    def abort(self, state: RequestState, reason: str, t: float, kind: str = INVALID) -> None:
        """End `state` without finishing it. `kind` says whose doing it was: INVALID (the request
        cannot be served as given), INTERNAL (the engine failed serving it), CANCELLED (its client)."""
        if state.done:
            return
        state.done = True
        self.emit(t, state, Ev.ABORTED, None, reason=reason, error_kind=kind)
        self._cleanup(state)
        self.outputs[state.rid] = RequestOutput(state.rid, list(state.output), None, "abort", reason, state.prompt_len, error_kind=kind)
        if self.on_output:
            self.on_output(state.rid, [], "abort", None)

    def _cleanup(self, state: RequestState) -> None:
        if state.pulling:  # a batch in flight still reads the senders' blocks: they go when it completes
            keep = {k for s in state.senders for k in state.keys_of(s)}
            for key in [k for k in state.holds if k not in keep]:
                state.release(key)
        else:
            state.release_all()
            for sender in state.senders:
                self.instances[sender].outgoing -= 1
            state.senders = []
        for inst in self.instances.values():
            if state in inst.running:
                inst.running.remove(state)
        # A worker that may hold this sequence's decode state forgets it before its next batch.
        for iid in {state.prefill_instance, state.decode_instance} - {None}:
            if self.instances[iid].has(Role.DECODE):
                self.instances[iid].pending_release.append(state.rid)

    def _fail_batch(self, inst: Instance, batch: Batch, failure: BatchFailure) -> None:
        ids = [i.request_id for i in batch.items] if isinstance(batch, (EncodeBatch, PrefillBatch)) else list(batch.step)
        for rid in ids:
            if rid in self.states:
                self.abort(self.states[rid], f"worker {inst.id} failed: {failure.reason}", failure.time, INTERNAL)
