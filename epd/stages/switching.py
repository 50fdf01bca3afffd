"""Role switching: an instance leaves its stage (its queue handed to siblings, running decodes
finished, what it sent pulled first), then becomes a worker of another pool."""

from __future__ import annotations

from collections import Counter
from typing import Optional

from epd.config import POOL_ROLES, ROLES, PoolConfig, Role, describe_layout
from epd.lifetime import SYSTEM
from epd.lifetime import LifetimeEvent as Ev
from epd.stages.instance import Instance
from epd.stages.schedulers import select_decode, select_prefill
from epd.stages.state import RequestState
from epd.stages.work import (
    Batch,
    BatchFailure,
    Result,
    SwitchBatch,
)


class RoleSwitching:
    """Pipeline part: moving instances between stages."""

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
        partial = [s for s in inst.prefill_queue if s.prefilled and not s.done]  # their KV is here: they finish here
        moving = [s for s in inst.prefill_queue if not s.prefilled and not s.done]
        inst.prefill_queue.clear()
        inst.prefill_queue.extend(partial)
        for state in moving:
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
        if inst.has(Role.PREFILL) and inst.prefill_queue:  # chunks of prompts begun here
            batch = select_prefill(inst, self.max_pending, self.pulled, self.policy)
            if batch:
                return batch
        if inst.has(Role.DECODE) and inst.running:
            return select_decode(inst, self.pulled, self.policy, self.preempt)
        if inst.drained():
            target = inst.switching_to
            return SwitchBatch(POOL_ROLES[target], self.deployment.pools()[target], inst.take_releases())
        return None

    def _share_queued_work(self, inst: Instance, role: Role) -> None:
        """A worker that joins a stage takes its share of the work queued at its siblings that holds
        nothing there yet (from the back of their queues): what was routed before the switch would
        otherwise wait behind the old instances while the new one idles."""
        siblings = [o for o in self.by_role[role] if o is not inst]
        queue_of = {Role.ENCODE: "encode_queue", Role.PREFILL: "prefill_queue", Role.DECODE: "decode_queue"}[role]

        def movable(o: Instance) -> list:
            items = getattr(o, queue_of)
            if role == Role.ENCODE:
                return [w for w in items if not w.state.done]
            if role == Role.PREFILL:
                return [s for s in items if not s.done and s.prefilled == 0 and s.prefill_instance == o.id]
            return [s for s in items if not s.done and not s.kv_local and s.decode_instance == o.id]

        share = sum(len(movable(o)) for o in siblings) // (len(siblings) + 1)
        for o in sorted(siblings, key=lambda o: -len(movable(o))):
            items = movable(o)
            n = min(share, len(items) - share)  # from its back, leaving it at least as many as it gives
            if n <= 0:
                continue
            take = items[-n:]
            queue = getattr(o, queue_of)
            gone = {id(x) for x in take}
            setattr(o, queue_of, type(queue)(x for x in queue if id(x) not in gone))
            for x in take:
                getattr(inst, queue_of).append(x)
                if role == Role.PREFILL:
                    x.prefill_instance = inst.id
                elif role == Role.DECODE:
                    x.decode_instance = inst.id
            share -= len(take)

    def _enter_service(self, inst: Instance, pool: str, roles: tuple[str, ...], cfg: PoolConfig) -> None:
        """`inst` serves `roles` with fresh block pools (after a role switch, or as a replaced worker) and
        takes its share of its siblings' queued work."""
        inst.configure(pool, roles, cfg)
        for role in inst.roles:
            self.by_role[role].append(inst)
            self._share_queued_work(inst, role)

    def lose_instance(self, inst: Instance, reason: str, t: float) -> None:
        """Its worker died: the instance leaves service. Work queued there that holds nothing on it goes
        to a sibling of its stage; a request that had work or data there starts over on the siblings
        (its images encoded again, its prompt and what it had sampled prefilled again); one a live worker's
        batch is reading from the dead one at this moment starts over when that batch is back (until then
        the reader writes into its blocks). Only a request whose stage has no worker left is aborted."""
        if inst.failed:
            return
        inst.failed = reason
        if self.replaces_lost:  # what would find its stage empty waits for the replacement
            self.coming.add(inst.id)
        for role in inst.roles:
            if inst in self.by_role[role]:
                self.by_role[role].remove(inst)
        self.events.emit(self._t(t), SYSTEM, Ev.WORKER_LOST, inst.id, reason=reason, layout=self.layout())
        why = f"worker {inst.id} died: {reason}"
        encode = [w.state for w in inst.encode_queue]
        prefill, decode = list(inst.prefill_queue), list(inst.decode_queue)
        inst.encode_queue.clear()
        inst.prefill_queue.clear()
        inst.decode_queue.clear()
        redone: set[str] = set()
        for state in list(self.states.values()):  # what lived on the lost worker: redone elsewhere
            if state.done or not self.tied_to(state, inst):
                continue
            if state.pulling and self._receiver(state) != inst.id:  # a live worker is copying from the dead one
                state.pull_lost = why
                for key in state.keys_of(inst.id):  # the dead worker's pools go with it
                    state.release(key)
                state.senders = [s for s in state.senders if s != inst.id]
                redone.add(state.rid)
            else:
                self.start_over(state, inst, "worker_lost")
                redone.add(state.rid)
        for state in encode:  # queued here, not encoded anywhere yet (or part of it elsewhere): on a sibling
            if state.done or state.rid in redone:
                continue
            redone.add(state.rid)  # once, however many of its images were queued here
            if state.holds or state.images_pending != len(state.media):
                self.start_over(state, inst, "worker_lost")
                continue
            for other in self.instances.values():
                other.encode_queue = type(other.encode_queue)(w for w in other.encode_queue if w.state is not state)
            state.prefill_instance = None
            self._route_encode(state)
        for state in prefill:
            if state.done or state.prefill_instance != inst.id:
                continue
            state.prefill_instance = None
            self._route_prefill(state)
        for state in decode:
            if state.done or state.decode_instance != inst.id:
                continue
            if state.kv_local:
                self.start_over(state, inst, "worker_lost")
            else:
                self._route_decode(state, self.instances[state.prefill_instance])
        inst.running.clear()

    def rejoin_instance(self, inst: Instance, t: float, took_s: float) -> None:
        """A replacement for lost `inst`'s worker is up (same roles, empty caches): the instance serves
        again with fresh block pools and takes a share of its siblings' queued work."""
        if not inst.failed or inst.inflight:
            raise RuntimeError(f"instance {inst.id} cannot rejoin: failed={inst.failed!r}, {inst.inflight} batches in flight")
        inst.failed = None
        inst.running.clear()
        inst.pending_release.clear()  # the new worker holds no sequence to forget
        inst.outgoing = 0
        inst.prefilled_last = False
        self._enter_service(inst, inst.pool, inst.roles, inst.cfg)
        self.coming.discard(inst.id)
        self.events.emit(self._t(t), SYSTEM, Ev.WORKER_REPLACED, inst.id, took_s=took_s, layout=self.layout())
        self._unpark()

    def replacement_abandoned(self, inst: Instance) -> None:
        """No replacement for `inst` will come: what waits for its stage and has no other worker is aborted."""
        self.coming.discard(inst.id)
        self._unpark()

    def tied_to(self, state: RequestState, inst: Instance) -> bool:
        """Whether `state` has work or data on `inst` that dies with it."""
        return bool(state.keys_of(inst.id)) or inst.id in state.senders or state in inst.running

    @staticmethod
    def _receiver(state: RequestState) -> str | None:
        """The instance whose batch is pulling `state`'s data: decode pulls KV, else prefill pulls images."""
        return state.decode_instance if state.kv_handle is None and state.decode_instance else state.prefill_instance

    def _switched(self, inst: Instance, batch: SwitchBatch, result: Result | BatchFailure) -> None:
        old, target = inst.pool, inst.switching_to
        if isinstance(result, BatchFailure):
            inst.failed = result.reason  # out of service; the others keep serving
            self.events.emit(self._t(result.time), SYSTEM, Ev.ROLE_SWITCH_END, inst.id, from_pool=old, to_pool=target, failed=result.reason)
            return
        b, e = result.span
        self._enter_service(inst, target, batch.roles, batch.pool)
        inst.switching_to = None
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
