"""Starting a request over: its work on one instance is given up, and it goes back through the
pipeline from its images (an encoder-cache hit where the cache is on), then a prefill of its prompt
and the tokens it had sampled, as vLLM's recompute does; what it already streamed stays streamed.

Two causes: preemption under KV on demand (a running sequence gives its blocks back for others), and
a worker that died (what the request had there is gone; the siblings redo it).
"""

from __future__ import annotations

from epd.config import Role
from epd.lifetime import LifetimeEvent as Ev
from epd.stages.instance import Instance
from epd.stages.state import RequestState


class Preemption:
    """Pipeline part: taking a request's work off an instance to be recomputed elsewhere or later."""

    def preempt(self, inst: Instance, state: RequestState, cause: str = "preempted") -> None:
        """Take `state` off `inst`, where it decodes or was being taken in for decoding, and start it over."""
        if inst.has(Role.DECODE):  # the worker forgets it before the batch being built
            inst.pending_release.append(state.rid)
        self.start_over(state, inst, cause)

    def start_over(self, state: RequestState, inst: Instance, cause: str) -> None:
        """Give up everything `state` holds or waits for (blocks, queue places, senders' outputs) and
        route it again from its images. `inst`: where its work was given up."""
        for other in self.instances.values():
            if state in other.running:
                other.running.remove(state)
            if any(w.state is state for w in other.encode_queue):
                other.encode_queue = type(other.encode_queue)(w for w in other.encode_queue if w.state is not state)
            for queue in (other.prefill_queue, other.decode_queue):
                while state in queue:
                    queue.remove(state)
        state.release_all()
        for sender in state.senders:
            self.instances[sender].outgoing -= 1
        state.senders, state.pulling, state.kv_handle, state.pull_lost = [], False, None, None
        if state.steps_inflight:  # their tokens come back after this (or their batch fails): dropped
            where = state.decode_instance or inst.id
            state.stale_steps[where] = state.stale_steps.get(where, 0) + state.steps_inflight
            state.steps_inflight = 0
        state.preemptions += cause == "preempted"
        state.attempt += 1
        self.emit(self.now, state, Ev.PREEMPTED, inst.id, num_output_tokens=len(state.output), cause=cause)
        state.kv_local = False
        state.decode_instance = state.prefill_instance = None
        state.prefilled = state.mm_rows_done = state.prefix_hit = 0
        state.images_pending = 0
        state.mm = {}
        if state.media:
            self._route_encode(state, front=True)
        else:
            self._route_prefill(state, front=True)
