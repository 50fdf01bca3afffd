"""Hand-offs between instances: when the receiving stage pulls what a sender holds, and when the
sender's blocks are freed (at send time for backends that copy the data out; otherwise once the
pulling batch has completed)."""

from __future__ import annotations

from epd.stages.instance import Instance
from epd.stages.state import RequestState
from epd.stages.work import (
    Batch,
    DecodeBatch,
    MixedBatch,
    PrefillBatch,
)


class HandOff:
    """Pipeline part: the bridges between stages."""

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

    def _pull_done(self, batch: Batch, inst: Instance) -> set[str]:
        """`inst`'s batch that pulled is back: the senders' blocks go. Returns the requests started over
        because a sender died during the pull (what the batch made of them is dropped)."""
        if isinstance(batch, MixedBatch):
            return self._pull_done(batch.decode, inst) | self._pull_done(batch.prefill, inst)
        if isinstance(batch, PrefillBatch):
            rids = [it.request_id for it in batch.items]
        elif isinstance(batch, DecodeBatch):
            rids = [n.request_id for n in batch.new]
        else:
            return set()
        redo = set()
        for rid in rids:
            state = self.states.get(rid)
            if state is not None and state.pulling:
                state.pulling = False
                self._release_senders(state)
                if state.forgotten:
                    del self.states[rid]
                elif state.pull_lost and not state.done:
                    self.preempt(inst, state, "worker_lost")  # a decode reader took the sequence in: it forgets it
                    redo.add(rid)
        return redo
