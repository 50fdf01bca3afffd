"""Where a request goes next: its images to E instances (spread over several with intra-request
parallelism), then a P instance, then a D instance (the P instance itself when it decodes)."""

from __future__ import annotations

from collections.abc import Callable

from epd.config import Role
from epd.request import INTERNAL
from epd.stages.instance import EncodeWork, Instance
from epd.stages.state import RequestState


class Routes:
    """Pipeline part: routing between stages."""

    def _none_in_service(self, state: RequestState, role: Role, route: Callable[[], None]) -> bool:
        """No worker of `role` is in service. If a replacement for one is starting, the request waits for
        it (`route` is called again when it rejoins); otherwise it is aborted."""
        if self.by_role[role]:
            return False
        if self._replacement_coming(role):
            self.parked.append((state, role, route))
        else:
            self.abort(state, f"no {role.value} worker is in service", self.now, INTERNAL)
        return True

    def _replacement_coming(self, role: Role) -> bool:
        return any(role in self.instances[iid].roles for iid in self.coming)

    def _unpark(self) -> None:
        """Route again what waited for a stage: it is back, or no replacement for it is coming any more
        (then the route aborts it)."""
        waiting, self.parked = self.parked, []
        for state, role, route in waiting:
            if state.done:
                continue
            if self.by_role[role] or not self._replacement_coming(role):
                route()
            else:
                self.parked.append((state, role, route))

    def _route_encode(self, state: RequestState, front: bool = False) -> None:
        """`front`: ahead of the queue (a preempted request, whose images are most likely cached)."""
        if self._none_in_service(state, Role.ENCODE, lambda: self._route_encode(state, front)):
            return
        encoders = self.by_role[Role.ENCODE]
        n = len(state.media)
        if self.deployment.irp:
            targets = self.router.spread(Role.ENCODE, encoders, n)
        else:
            targets = [self._holding(state, encoders) or self.router.choose(Role.ENCODE, encoders)] * n
        state.images_pending = n
        for i, inst in enumerate(targets):
            if front:
                inst.encode_queue.appendleft(EncodeWork(state, i))
            else:
                inst.encode_queue.append(EncodeWork(state, i))
        if targets[0].has(Role.PREFILL):
            state.prefill_instance = targets[0].id

    @staticmethod
    def _holding(state: RequestState, encoders: list[Instance]) -> Instance | None:
        """The encoder whose cache holds the most of the request's images, if any holds one."""
        best, most = None, 0
        for inst in encoders:
            if inst.encoder_cache is not None:
                have = sum(1 for k in state.image_keys if k in inst.encoder_cache)
                if have > most:
                    best, most = inst, have
        return best

    def _route_prefill(self, state: RequestState, front: bool = False) -> None:
        if state.prefill_instance is None:
            if self._none_in_service(state, Role.PREFILL, lambda: self._route_prefill(state, front)):
                return
            state.prefill_instance = self.router.choose(Role.PREFILL, self.by_role[Role.PREFILL]).id
        queue = self.instances[state.prefill_instance].prefill_queue
        if front:  # behind the prompts already part-way through their chunks: they hold blocks
            at = next((i for i, s in enumerate(queue) if s.prefilled == 0), len(queue))
            queue.insert(at, state)
        else:
            queue.append(state)
        self._pull_first_if_switching(state)

    def _route_decode(self, state: RequestState, prefill_inst: Instance) -> None:
        if prefill_inst.has(Role.DECODE):
            state.kv_local = True
            inst = prefill_inst
        else:
            if self._none_in_service(state, Role.DECODE, lambda: self._route_decode(state, prefill_inst)):
                return
            inst = self.router.choose(Role.DECODE, self.by_role[Role.DECODE])
        state.decode_instance = inst.id
        inst.decode_queue.append(state)
        self._pull_first_if_switching(state)
