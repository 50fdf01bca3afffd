"""Per-stage batch selection, shared by the engine and the simulator.

E: FCFS images up to a batch limit, each needing MM blocks (or none: a hit in the encoder cache).
P: FCFS prompts under a per-step token budget; with chunked prefill a prompt longer than what is
left of the budget goes in chunks, one per step, so a long prompt neither blocks short ones behind
it nor holds a step for its whole length. A prompt is admitted (its first chunk) only when KV (and
MM for pulled embeddings) blocks are free, and where it will also decode, while fewer than max_decode_seqs
sequences hold KV there (running, prefilled or prefilling: vLLM's max_num_seqs). D: continuous batching. With `reserve` a sequence is
admitted only when the KV for its whole output is reserved, so a running batch never runs out;
`on_demand` allocates blocks as sequences grow and, when the pool runs dry, preempts the newest
running sequence (its blocks freed; it is recomputed later). An instance that prefills and decodes
runs both in one step: its decodes first, then prefill chunks up to the budget.

With async scheduling a step is dispatched before the previous one's tokens are back: a sequence
takes a step only while the steps in flight leave it short of max_tokens, and one that stopped (EOS,
a stop token) is seen a step late, its extra token discarded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from epd.config import Role
from epd.stages.instance import Instance
from epd.stages.prefix_cache import block_hashes
from epd.stages.state import Hold, RequestState
from epd.stages.work import DecodeBatch, EncodeBatch, EncodeItem, MMSource, NewDecodeSeq, PrefillBatch, PrefillItem

# Told when a batch takes a request whose data another instance holds (the pipeline's hand-off bookkeeping).
OnPull = Callable[[RequestState], None]
# Told to preempt a running sequence of the instance (free its KV there, send it back to be recomputed).
OnPreempt = Callable[[Instance, RequestState], None]


@dataclass(frozen=True)
class Policy:
    chunked: bool = True  # chunked prefill
    reserve: bool = False  # KV for prompt + max_tokens reserved at admission (no preemption)
    image_token: int = -1  # the placeholder id: which prompt positions take image-embedding rows


def select_encode(inst: Instance, max_pending: int) -> Optional[EncodeBatch]:
    if inst.outgoing >= max_pending:
        return None  # back-pressure: prefill has not pulled what we already sent
    if (
        inst.has(Role.PREFILL)
        and inst.cfg.encode_ahead_steps
        and _prefill_backlog_reaches(inst, inst.cfg.encode_ahead_steps * inst.cfg.max_prefill_tokens)
    ):
        return None  # enough encoded prompts wait for prefill here: prefill them first
    items: list[EncodeItem] = []
    send = not inst.has(Role.PREFILL)
    while inst.encode_queue and len(items) < inst.cfg.max_images_per_batch:
        work = inst.encode_queue[0]
        state = work.state
        if state.done:
            inst.encode_queue.popleft()
            continue
        n_tokens = state.image_tokens[work.image_index]
        need = inst.mm.blocks_for(n_tokens)
        cache = inst.encoder_cache
        key = state.image_keys[work.image_index] if cache is not None and state.image_keys else None
        hit = cache.lookup(key) if key else None
        blocks = hit if hit is not None else (cache.add(key, need) if key else None)
        owner = cache if blocks is not None else inst.mm  # cached blocks are released to the cache
        if blocks is None:
            blocks = inst.allocate_mm(need)
            if blocks is None:
                break
        inst.encode_queue.popleft()
        state.hold(Hold.mm(inst.id, work.image_index), owner, blocks)
        items.append(
            EncodeItem(state.rid, work.image_index, state.media[work.image_index], n_tokens, blocks, send, hit is not None, state.attempt)
        )
    return EncodeBatch(items) if items else None


def _prefill_backlog_reaches(inst: Instance, tokens: int) -> bool:
    """The sequences in this instance's prefill queue have at least `tokens` still to prefill (read on every
    dispatch: stops counting once there)."""
    left = tokens
    for s in inst.prefill_queue:
        if not s.done:
            left -= s.prompt_len + len(s.output) - s.prefilled
            if left <= 0:
                return True
    return False


def select_prefill(inst: Instance, max_pending: int, on_pull: OnPull, policy: Policy) -> Optional[PrefillBatch]:
    if not inst.has(Role.DECODE) and inst.outgoing >= max_pending:
        return None
    items = take_prefill(inst, inst.cfg.max_prefill_tokens, on_pull, policy)
    return PrefillBatch(items, inst.take_releases()) if items else None


def take_prefill(inst: Instance, budget: int, on_pull: OnPull, policy: Policy) -> list[PrefillItem]:
    """Prefill work for one step of at most `budget` tokens, FCFS: whole prompts, and with chunked
    prefill a chunk of the first one that does not fit (it stays at the head of the queue)."""
    items: list[PrefillItem] = []
    queue = inst.prefill_queue
    while queue and budget > 0:
        state = queue[0]
        if state.done:
            queue.popleft()
            continue
        seq = state.sequence
        if state.prefilled == 0:
            if not policy.chunked and len(seq) > budget:
                break
            if not _admit_prefill(inst, state, seq, policy, on_pull):
                break
        start = state.prefilled
        n = min(len(seq) - start, budget) if policy.chunked else len(seq) - start
        chunk = seq[start : start + n]
        final = start + n == len(seq)
        sp = state.req.sampling
        images = [state.mm[i] for i in range(len(state.image_tokens))]
        items.append(
            PrefillItem(
                state.rid,
                chunk,
                images,
                state.blocks(Hold.kv(inst.id)),
                sp,
                send_kv=not inst.has(Role.DECODE),
                keep_for_decode=inst.has(Role.DECODE),
                start=start,
                total=len(seq),
                mm_offset=state.mm_rows_done,
                prompt_end=state.prompt_len,
                prompt=state.prompt_ids if final and sp.needs_history else None,
                generated=list(state.output) if final else [],
                attempt=state.attempt,
                rope=state.rope,
                state_slot=state.state_slot(inst.id),
            )
        )
        for i in range(len(images)):  # pulled with this chunk: later chunks read the local copy
            if images[i].handle is not None:
                state.mm[i] = MMSource(images[i].num_tokens, images[i].blocks)
        state.prefilled += n
        state.mm_rows_done += sum(1 for t in chunk[: max(0, state.prompt_len - start)] if t == policy.image_token) if images else 0
        budget -= n
        if not final:
            break  # the budget is spent: the rest of it goes in the next steps
        queue.popleft()
    return items


def _admit_prefill(inst: Instance, state: RequestState, seq: list[int], policy: Policy, on_pull: OnPull) -> bool:
    """A sequence's first chunk: blocks for its whole KV here (and its pulled images), or False."""
    decode_here = inst.has(Role.DECODE)
    if decode_here and not inst.can_hold_sequence():
        return False  # max_decode_seqs sequences hold KV here already: this one waits until one leaves
    kv_tokens = len(seq) + (state.req.sampling.max_tokens - len(state.output) if decode_here and policy.reserve else 0)
    kv_need = inst.kv.blocks_for(kv_tokens)
    pulled = [i for i, m in state.mm.items() if m.handle is not None]
    mm_need = sum(inst.mm.blocks_for(state.image_tokens[i]) for i in pulled)
    hit: list[int] = []
    cache = inst.prefix_cache
    if cache is not None:
        bs = inst.kv.block_tokens
        state.block_hashes = block_hashes(seq, bs, policy.image_token, state.image_keys, state.image_tokens, state.prompt_len)
        hit = cache.match(state.block_hashes, (len(seq) - 1) // bs)  # the last token is computed: its step samples
    if not inst.can_allocate_kv(kv_need - len(hit)) or not inst.can_allocate_mm(mm_need):
        if hit:
            cache.free(hit)
        return False
    if not inst.hold_kv(state, hit + inst.allocate_kv(kv_need - len(hit))):
        return False
    for i in pulled:
        blocks = inst.allocate_mm(inst.mm.blocks_for(state.image_tokens[i]))
        state.hold(Hold.mm(inst.id, i), inst.mm, blocks)
        state.mm[i] = MMSource(state.image_tokens[i], blocks, state.mm[i].handle)
    state.prefilled = state.prefix_hit = len(hit) * inst.kv.block_tokens
    cached = seq[: min(state.prefilled, state.prompt_len)]
    state.mm_rows_done = sum(1 for t in cached if t == policy.image_token) if state.image_tokens else 0
    on_pull(state)
    return True


def select_decode(inst: Instance, on_pull: OnPull, policy: Policy, on_preempt: OnPreempt) -> Optional[DecodeBatch]:
    new: list[NewDecodeSeq] = []
    while inst.decode_queue and len(inst.running) < inst.cfg.max_decode_seqs:
        state = inst.decode_queue[0]
        if state.done:
            inst.decode_queue.popleft()
            continue
        if not state.kv_local:
            sp = state.req.sampling
            tokens = state.prompt_len + sp.max_tokens if policy.reserve else state.kv_len
            blocks = inst.allocate_kv(inst.kv.blocks_for(tokens))
            if blocks is None or not inst.hold_kv(state, blocks):
                break
            prompt = state.prompt_ids if sp.needs_history else None
            history = list(state.output) if len(state.output) > 1 else None
            slot = state.state_slot(inst.id)
            last = state.output[-1]
            new.append(NewDecodeSeq(state.rid, state.kv_handle, blocks, state.kv_len, last, sp, prompt, history, state.rope, slot))
            state.kv_handle = None
            on_pull(state)
        inst.decode_queue.popleft()
        inst.running.append(state)
    fresh = {n.request_id for n in new}
    step: list[RequestState] = []
    grow: dict[str, list[int]] = {}
    live, count = None, len(inst.running)  # the running set, rebuilt only once a preemption has shrunk it
    for s in list(inst.running):
        if (live is not None and s not in live) or len(s.output) + s.steps_inflight >= s.req.sampling.max_tokens:
            continue  # preempted for an older sequence's block, or every step it may take is in flight
        if not policy.reserve:
            blocks = _grow(inst, s, fresh, on_preempt)
            if len(inst.running) != count:
                live, count = set(inst.running), len(inst.running)
            if blocks is None:
                continue
            if blocks:
                grow[s.rid] = blocks
        step.append(s)
    if not step and not new:
        return None
    for s in step:
        s.steps_inflight += 1
    return DecodeBatch([s.rid for s in step], new, inst.take_releases(), grow)


def _grow(inst: Instance, s: RequestState, fresh: set[str], on_preempt: OnPreempt) -> Optional[list[int]]:
    """The blocks `s` needs for its next step (the position it writes), preempting the newest running
    sequences while the pool has too few; None when it cannot step now."""
    key = Hold.kv(inst.id)
    need = inst.kv.blocks_for(s.prompt_len + len(s.output) + s.steps_inflight) - len(s.blocks(key))
    if need <= 0:
        return []
    while not inst.can_allocate_kv(need):
        # Newer than `s` only (the older ones may have their step in this batch already); not one whose
        # KV is being pulled in now: it can be preempted a step later.
        newer = inst.running[inst.running.index(s) :]
        victim = next((v for v in reversed(newer) if v.rid not in fresh and not v.pulling), None)
        if victim is None:
            return None
        on_preempt(inst, victim)
        if victim is s:
            return None
    blocks = inst.allocate_kv(need)
    s.extend(key, blocks)
    return blocks
