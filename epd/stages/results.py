"""What the pipeline does with a batch's result: encoded images go on to prefill, prefilled requests
to decode, tokens to the output; and how requests end (finished, aborted, a failed batch)."""

from __future__ import annotations

from typing import Optional

from epd.config import Role
from epd.lifetime import LifetimeEvent as Ev
from epd.request import INTERNAL, INVALID, RequestOutput, TokenLogprob
from epd.stages.instance import Instance
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
    request_ids,
)

PULL_RETRIES = 2  # a request whose KV or image pull failed starts over this many times before it is aborted


class Results:
    """Pipeline part: results and endings."""

    def _live(self, rid: str) -> Optional[RequestState]:
        """The request's state, unless it has ended (or been forgotten) since its batch was sent."""
        state = self.states.get(rid)
        return None if state is None or state.done else state

    def _encoded(self, inst: Instance, batch: EncodeBatch, result: EncodeResult) -> None:
        b, e = result.span
        if result.prep_begin is not None:  # the images' host work is the encode stage's too
            b = min(b, result.prep_begin)
        sent = {(it.request_id, it.image_index): it for it in batch.items}
        cache = inst.encoder_cache
        # Encoded images first: a copy in this batch that waited on one of them learns how it went.
        for item in sorted(result.items, key=lambda it: sent[it.request_id, it.image_index].cached):
            work = sent[item.request_id, item.image_index]
            hit, blocks = work.cached, work.mm_blocks
            if cache is not None and cache.holds(blocks):
                if hit and not item.error and cache.failure(blocks):
                    item.error = cache.failure(blocks)  # the same bytes failed for the request that encoded them
                elif not hit and item.error:
                    cache.fail(blocks, item.error)
            state = self._live(item.request_id)
            if state is None or state.attempt != work.attempt:
                continue  # ended, or started over since this was sent
            if item.error:
                self.abort(state, item.error, e, item.error_kind)
                continue
            self.emit(b, state, Ev.ENCODE_BEGIN, inst.id, image=item.image_index)
            self.emit(e, state, Ev.ENCODE_END, inst.id, image=item.image_index, cached=hit)
            key = Hold.mm(inst.id, item.image_index)
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

    def _prefilled(self, inst: Instance, batch: PrefillBatch, result: PrefillResult) -> None:
        b, e = result.span
        chunks = {it.request_id: it for it in batch.items}
        for item in result.items:
            state = self._live(item.request_id)
            if state is None or state.attempt != chunks[item.request_id].attempt:
                continue  # ended, or started over since this was sent
            if item.error and self._pull_failed(state, inst, [m.handle for m in chunks[item.request_id].images]):
                continue  # its images died with their encoder, or their transfer broke: encoded again
            if item.error:
                self.abort(state, f"prefill on {inst.id} failed: {item.error}", e, INTERNAL)
                continue
            if item.mm_transfer:
                nbytes = sum(state.image_tokens) * self.mm_bytes_per_token
                self.emit(item.mm_transfer[0], state, Ev.MM_TRANSFER_BEGIN, inst.id, bytes=nbytes)
                self.emit(item.mm_transfer[1], state, Ev.MM_TRANSFER_END, inst.id)
            chunk = chunks[item.request_id]
            if chunk.start == state.prefix_hit:  # its first chunk
                total = chunk.total or len(chunk.prompt_ids)
                self.emit(b, state, Ev.PREFILL_BEGIN, inst.id, tokens=total, cached_tokens=state.prefix_hit, recompute=bool(state.output))
            if not chunk.final:
                continue
            self.emit(e, state, Ev.PREFILL_END, inst.id)
            if inst.prefix_cache is not None and state.block_hashes:  # its KV is written: later prompts may reuse it
                inst.prefix_cache.register(state.block_hashes, state.blocks(Hold.kv(inst.id)))
            if not state.output:
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

    def _pull_failed(self, state: RequestState, inst: Instance, handles: list) -> bool:
        """A batch that pulled `state`'s KV or images failed it: started over (True) when the sender is lost, or —
        as the failure may arrive before the sender's loss is known, or a transfer may break on its own — at most
        PULL_RETRIES times; False (the caller aborts it) for a request that pulled nothing, or has been retried."""
        handles = [h for h in handles if h is not None]
        if not handles:
            return False
        if self._from_lost(handles):
            self.start_over(state, inst, "worker_lost")
            return True
        if state.pull_retries < PULL_RETRIES:
            state.pull_retries += 1
            self.start_over(state, inst, "pull_failed")
            return True
        return False

    def _from_lost(self, handles) -> bool:
        """Whether any of these transfer handles came from a worker that has died since (what it sent may
        have died with it: a pull that failed is then no fault of the request)."""
        for h in handles:
            sender = getattr(h, "worker", None)
            if sender in self.instances and self.instances[sender].failed:
                return True
        return False

    def _decoded(self, inst: Instance, result: DecodeResult, stale: set[str] = frozenset(), batch: Optional[DecodeBatch] = None) -> None:
        """`stale`: sequences preempted after their step was sent; their tokens are dropped."""
        b, e = result.span
        pulled = {n.request_id: n.kv_handle for n in batch.new} if batch is not None else {}
        for rid, (tb, te) in result.kv_transfers.items():
            state = self._live(rid)
            if state is not None:
                self.emit(tb, state, Ev.KV_TRANSFER_BEGIN, inst.id, bytes=state.kv_len * self.kv_bytes_per_token)
                self.emit(te, state, Ev.KV_TRANSFER_END, inst.id)
        for rid, why in result.errors.items():
            if rid in stale or (state := self._live(rid)) is None:
                continue
            if not self._pull_failed(state, inst, [pulled.get(rid)]):  # its KV died with its prefill worker: prefilled again
                self.abort(state, f"decode on {inst.id} failed: {why}", e, INTERNAL)
        for rid, tok in result.tokens.items():
            state = self._live(rid)
            if state is None or rid in stale:
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

    def _fail_batch(self, inst: Instance, batch: Batch, failure: BatchFailure, redo: set[str] = frozenset()) -> None:
        """`redo`: requests already started over (a sender died while this batch pulled from it)."""
        ids = [rid for rid in request_ids(batch) if rid not in redo]
        if isinstance(batch, EncodeBatch) and inst.encoder_cache is not None:  # what was to be encoded never was
            for it in batch.items:
                if not it.cached and inst.encoder_cache.holds(it.mm_blocks):
                    inst.encoder_cache.fail(it.mm_blocks, failure.reason)
        if failure.worker_lost:  # what it held or was doing is redone by its siblings
            self.lose_instance(inst, failure.reason, failure.time)
            return
        for rid in ids:
            if rid in self.states:
                self.abort(self.states[rid], f"worker {inst.id} failed: {failure.reason}", failure.time, INTERNAL)
