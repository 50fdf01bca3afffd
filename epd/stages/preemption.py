"""Preemption under KV on demand: a running sequence gives its KV blocks back and starts over from
its images (a hit in the encoder cache where it is on), then prefills its prompt and the tokens it
had sampled, as vLLM's recompute does; what it already streamed stays streamed."""

from __future__ import annotations

from epd.lifetime import LifetimeEvent as Ev
from epd.stages.instance import Instance
from epd.stages.state import Hold, RequestState


class Preemption:
    """Pipeline part: taking a running sequence off an instance to be recomputed later."""

    def preempt(self, inst: Instance, state: RequestState) -> None:
        inst.running.remove(state)
        state.release(Hold.kv(inst.id))
        inst.pending_release.append(state.rid)  # the worker forgets it before the batch being built
        if state.steps_inflight:  # their tokens come back after this: dropped
            state.stale_steps[inst.id] = state.stale_steps.get(inst.id, 0) + state.steps_inflight
            state.steps_inflight = 0
        state.preemptions += 1
        self.emit(self.now, state, Ev.PREEMPTED, inst.id, num_output_tokens=len(state.output))
        state.kv_local = False
        state.decode_instance = state.prefill_instance = None
        state.prefilled = state.mm_rows_done = 0
        state.mm = {}
        if state.req.images:
            self._route_encode(state, front=True)
        else:
            self._route_prefill(state, front=True)
