"""Per-stage batch selection, shared by the engine and the simulator.

E: FCFS images up to a batch limit, each needing MM blocks. P: FCFS prompts under a token
budget, admitted only when KV (and MM for pulled embeddings) blocks are free. D: continuous
batching; a sequence is admitted only when the KV for its whole output is reserved, so a
running batch can never run out of KV (no deadlock, no preemption needed). With async scheduling
a step is dispatched before the previous one's tokens are back: a sequence takes a step only
while the steps in flight leave it short of max_tokens (its KV reservation), and one that stopped
(EOS, a stop token) is seen a step late, its extra token discarded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from epd.config import Role
from epd.stages.instance import Instance
from epd.stages.state import Hold, RequestState
from epd.stages.work import DecodeBatch, EncodeBatch, EncodeItem, MMSource, NewDecodeSeq, PrefillBatch, PrefillItem

# Told when a batch takes a request whose data another instance holds (the pipeline's hand-off bookkeeping).
OnPull = Callable[[RequestState], None]


def select_encode(inst: Instance, max_pending: int) -> Optional[EncodeBatch]:
    if inst.outgoing >= max_pending:
        return None  # back-pressure: prefill has not pulled what we already sent
    items: list[EncodeItem] = []
    send = not inst.has(Role.PREFILL)
    while inst.encode_queue and len(items) < inst.cfg.max_images_per_batch:
        work = inst.encode_queue[0]
        state = work.state
        if state.done:
            inst.encode_queue.popleft()
            continue
        n_tokens = state.image_tokens[work.image_index]
        blocks = inst.mm.allocate(inst.mm.blocks_for(n_tokens))
        if blocks is None:
            break
        inst.encode_queue.popleft()
        state.hold(Hold.mm(inst.id, work.image_index), inst.mm, blocks)
        items.append(EncodeItem(state.rid, work.image_index, state.req.images[work.image_index], n_tokens, blocks, send))
    return EncodeBatch(items) if items else None


def select_prefill(inst: Instance, max_pending: int, on_pull: OnPull) -> Optional[PrefillBatch]:
    decode_here = inst.has(Role.DECODE)
    if not decode_here and inst.outgoing >= max_pending:
        return None
    budget = inst.cfg.max_prefill_tokens
    items: list[PrefillItem] = []
    while inst.prefill_queue:
        state = inst.prefill_queue[0]
        if state.done:
            inst.prefill_queue.popleft()
            continue
        if state.prompt_len > budget:
            break
        kv_tokens = state.prompt_len + (state.req.sampling.max_tokens if decode_here else 0)
        kv_need = inst.kv.blocks_for(kv_tokens)
        pulled = [i for i, m in state.mm.items() if m.handle is not None]
        mm_need = sum(inst.mm.blocks_for(state.image_tokens[i]) for i in pulled)
        if not inst.kv.can_allocate(kv_need) or not inst.mm.can_allocate(mm_need):
            break
        inst.prefill_queue.popleft()
        budget -= state.prompt_len
        kv_blocks = inst.kv.allocate(kv_need)
        state.hold(Hold.kv(inst.id), inst.kv, kv_blocks)
        for i in pulled:
            blocks = inst.mm.allocate(inst.mm.blocks_for(state.image_tokens[i]))
            state.hold(Hold.mm(inst.id, i), inst.mm, blocks)
            state.mm[i] = MMSource(state.image_tokens[i], blocks, state.mm[i].handle)
        on_pull(state)
        images = [state.mm[i] for i in range(len(state.image_tokens))]
        items.append(PrefillItem(state.rid, state.prompt_ids, images, kv_blocks, state.req.sampling, not decode_here, decode_here))
    if not items:
        return None
    return PrefillBatch(items, inst.take_releases())


def select_decode(inst: Instance, on_pull: OnPull) -> Optional[DecodeBatch]:
    new: list[NewDecodeSeq] = []
    while inst.decode_queue and len(inst.running) < inst.cfg.max_decode_seqs:
        state = inst.decode_queue[0]
        if state.done:
            inst.decode_queue.popleft()
            continue
        if not state.kv_local:
            blocks = inst.kv.allocate(inst.kv.blocks_for(state.prompt_len + state.req.sampling.max_tokens))
            if blocks is None:
                break
            state.hold(Hold.kv(inst.id), inst.kv, blocks)
            sp = state.req.sampling
            prompt = state.prompt_ids if sp.needs_history else None
            new.append(NewDecodeSeq(state.rid, state.kv_handle, blocks, state.prompt_len, state.output[-1], sp, prompt))
            state.kv_handle = None
            on_pull(state)
        inst.decode_queue.popleft()
        inst.running.append(state)
    step = [s for s in inst.running if len(s.output) + s.steps_inflight < s.req.sampling.max_tokens]
    if not step:
        return None
    for s in step:
        s.steps_inflight += 1
    return DecodeBatch([s.rid for s in step], new, inst.take_releases())
