"""Where a request goes next: its images to E instances (spread over several with intra-request
parallelism), then a P instance, then a D instance (the P instance itself when it decodes)."""

from __future__ import annotations

from epd.config import Role
from epd.request import INTERNAL
from epd.stages.instance import EncodeWork, Instance
from epd.stages.state import RequestState


class Routes:
    """Pipeline part: routing between stages."""

    def _none_in_service(self, state: RequestState, role: Role) -> bool:
        """No worker of `role` is left (lost ones are not replaced): the request is aborted."""
        if self.by_role[role]:
            return False
        self.abort(state, f"no {role.value} worker is in service", self.now, INTERNAL)
        return True

    def _route_encode(self, state: RequestState) -> None:
        if self._none_in_service(state, Role.ENCODE):
            return
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
            if self._none_in_service(state, Role.PREFILL):
                return
            state.prefill_instance = self.router.choose(Role.PREFILL, self.by_role[Role.PREFILL]).id
        self.instances[state.prefill_instance].prefill_queue.append(state)
        self._pull_first_if_switching(state)

    def _route_decode(self, state: RequestState, prefill_inst: Instance) -> None:
        if prefill_inst.has(Role.DECODE):
            state.kv_local = True
            inst = prefill_inst
        else:
            if self._none_in_service(state, Role.DECODE):
                return
            inst = self.router.choose(Role.DECODE, self.by_role[Role.DECODE])
        state.decode_instance = inst.id
        inst.decode_queue.append(state)
        self._pull_first_if_switching(state)
