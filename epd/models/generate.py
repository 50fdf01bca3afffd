"""Single-process batched generation over the paged runtime: the reference the engine must match."""

from __future__ import annotations

import random
from typing import Optional

import torch

from epd.kernels.attention import AttentionMetadata
from epd.models.device_tokens import Fed, feed
from epd.models.mrope import RopeLayout, rope_positions
from epd.models.runtime import ModelRuntime
from epd.models.sampling import sample
from epd.models.step_graphs import StepGraphs
from epd.request import SamplingParams


@torch.inference_mode()
def lm_step(
    rt: ModelRuntime,
    kv: torch.Tensor,
    tokens: list[list[int]],
    starts: list[int],
    tables: list[list[int]],
    block_size: int,
    mm: Optional[list[Optional[torch.Tensor]]] = None,
    mm_ends: Optional[list[int]] = None,
    graphs: Optional[StepGraphs] = None,
    rope: Optional[list[Optional[RopeLayout]]] = None,
    fed: Optional[Fed] = None,
    states: Optional[tuple[torch.Tensor, list[int]]] = None,
) -> torch.Tensor:
    """One forward over new tokens of several sequences (prefill and/or decode) -> last-token logits.

    mm[i]: the image-embedding rows of sequence i's placeholders among its new tokens, in order;
    mm_ends[i]: where its prompt ends (placeholder ids sampled after it are tokens, not images);
    graphs: piecewise CUDA graphs to run the layers through where the step's tokens fit them;
    rope[i]: sequence i's M-RoPE layout (None: its rotary positions are its cache positions);
    fed: token rows taken from earlier steps' sampled ids still on the device (decode rows);
    states: a hybrid LM's state pool and each sequence's slot in it (a sequence starting at 0 starts from zeros)."""
    assert rt.lm is not None
    flat = [t for seq in tokens for t in seq]
    ids = torch.tensor(flat, dtype=torch.long, device=rt.device)
    feed(ids, fed)
    pos = torch.tensor([s + i for seq, s in zip(tokens, starts) for i in range(len(seq))], device=rt.device)
    qlens = [len(seq) for seq in tokens]
    meta = AttentionMetadata.build(tables, qlens, [s + q for s, q in zip(starts, qlens)], block_size, rt.device)
    if getattr(rt.lm, "has_state", False):
        if states is None:
            raise ValueError(f"the {rt.text_cfg.arch} LM keeps per-sequence state: lm_step needs states=(pool, slots)")
        from epd.models.hybrid_lm import StepStates

        meta.states = StepStates(states[0], list(states[1]), [s == 0 for s in starts], qlens)
    mm_embeds = mm_mask = None
    if mm is not None and any(m is not None and m.shape[0] for m in mm):
        mm_embeds = torch.cat([m for m in mm if m is not None and m.shape[0]]).to(rt.device)
        big = 1 << 62
        ends = [(big if mm_ends is None else mm_ends[i]) if m is not None and m.shape[0] else 0 for i, m in enumerate(mm)]
        limit = torch.tensor(ends, device=rt.device).repeat_interleave(torch.tensor(qlens, device=rt.device))
        mm_mask = (ids == rt.family.image_token_id) & (pos < limit)
    rope_pos = pos
    if rope is not None and rt.lm.rotary.mrope_section is not None and any(r is not None for r in rope):
        rope_pos = rope_positions(rope, tokens, starts).to(rt.device, non_blocking=True)
    if graphs is not None and meta.states is None and graphs.fits(len(flat)):
        return rt.lm.logits(graphs.run(rt.lm.embed(ids, mm_embeds, mm_mask), rope_pos, meta), meta)
    return rt.lm(ids, rope_pos, kv, meta, mm_embeds, mm_mask)


def generate(
    rt: ModelRuntime,
    prompts: list[list[int]],
    mm_embeds: list[Optional[torch.Tensor]],
    params: list[SamplingParams],
    block_size: int = 16,
    seed: int = 0,
    rope: Optional[list[Optional[RopeLayout]]] = None,
) -> list[list[int]]:
    """Greedy/sampled generation for a batch; KV blocks are handed out in a shuffled order.
    rope: each prompt's M-RoPE layout (`family.rope_layout`), for families that have one."""
    eos = rt.text_cfg.eos_token_id
    need = [-(-(len(p) + sp.max_tokens) // block_size) for p, sp in zip(prompts, params)]
    pool = list(range(sum(need) + 1))
    random.Random(seed).shuffle(pool)
    kv = rt.allocate_kv_cache(len(pool), block_size)
    tables, i = [], 0
    for n in need:
        tables.append(pool[i : i + n])
        i += n
    rope = rope or [None] * len(prompts)
    pool_state = rt.allocate_state_pool(len(prompts) + 1)
    slots = list(range(1, len(prompts) + 1))  # not slot 0: a sequence's slot need not be its index
    states = (pool_state, slots) if pool_state is not None else None
    logits = lm_step(rt, kv, prompts, [0] * len(prompts), tables, block_size, mm_embeds, rope=rope, states=states)
    history = dict(prompts=prompts, eos_token_id=eos)
    outs = [[t] for t in sample(logits, params, [0] * len(prompts), outputs=[[] for _ in prompts], **history)]
    live = [i for i in range(len(prompts)) if not _done(outs[i], params[i], eos)]
    while live:
        logits = lm_step(
            rt,
            kv,
            [[outs[i][-1]] for i in live],
            [len(prompts[i]) + len(outs[i]) - 1 for i in live],
            [tables[i] for i in live],
            block_size,
            rope=[rope[i] for i in live],
            states=(pool_state, [slots[i] for i in live]) if states else None,
        )
        steps = [len(outs[i]) for i in live]
        toks = sample(
            logits, [params[i] for i in live], steps, prompts=[prompts[i] for i in live], outputs=[outs[i] for i in live], eos_token_id=eos
        )
        for i, tok in zip(live, toks):
            outs[i].append(tok)
        live = [i for i in live if not _done(outs[i], params[i], eos)]
    return outs


def _done(out: list[int], p: SamplingParams, eos: int) -> bool:
    if len(out) >= p.max_tokens:
        return True
    return not p.ignore_eos and (out[-1] == eos or out[-1] in p.stop_token_ids)
