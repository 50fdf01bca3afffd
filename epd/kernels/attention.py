"""Paged attention over a block-table KV cache: torch reference for prefill and decode.

Cache layout per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].
A token's slot is block_id * block_size + offset. A sequence's keys are the first `context_len`
slots of its block table; its queries are the last `query_len` of those positions (causal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from epd.kernels.varlen_prefill import VarlenLayout, usable, varlen_available, varlen_prefill


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: where each new token's K/V is written
    query_lens: list[int]  # new tokens per sequence (1 for decode)
    context_lens: list[int]  # total tokens per sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32 (padded with 0)
    block_size: int
    context_lens_t: torch.Tensor  # context_lens on the device, int32
    logits_indices: Optional[torch.Tensor]  # the last new token of each sequence; None: every token
    is_decode: bool = False  # one new token per sequence
    is_fresh_prefill: bool = False  # no earlier KV: queries attend only to this step's keys
    split: Optional[MixedSplit] = None  # a mixed step (decodes beside prefill chunks): its two parts
    # A fresh prefill's sequences grouped by length, with their rows: made once per step, not per layer
    # (a host-to-device copy from pageable memory waits for the stream, which would stall every layer).
    _length_groups: Optional[list[tuple[int, int, Optional[torch.Tensor]]]] = None
    varlen: Optional[VarlenLayout] = None  # CUDA prefill steps: offsets (and context slots) for one flash varlen call
    states: Optional[Any] = None  # a hybrid LM's step: its sequences' state slots (`epd.models.hybrid_lm.StepStates`)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @staticmethod
    def build(
        block_tables: list[list[int]], query_lens: list[int], context_lens: list[int], block_size: int, device: torch.device
    ) -> AttentionMetadata:
        slots: list[int] = []
        for table, qlen, ctx in zip(block_tables, query_lens, context_lens):
            for pos in range(ctx - qlen, ctx):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        is_decode = all(q == 1 for q in query_lens)
        ends = torch.tensor(query_lens, dtype=torch.long).cumsum(0) - 1
        fresh = list(query_lens) == list(context_lens)
        split = None
        if not is_decode and not fresh and 1 in query_lens and len(query_lens) > 1:
            split = MixedSplit.build(block_tables, query_lens, context_lens, block_size, device)
        tables = torch.tensor(padded, dtype=torch.int32, device=device)
        varlen = None
        if device.type == "cuda" and not is_decode and split is None and varlen_available():
            varlen = VarlenLayout(query_lens, context_lens, tables, block_size, fresh)
        return AttentionMetadata(
            varlen=varlen,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_tables=tables,
            block_size=block_size,
            context_lens_t=torch.tensor(context_lens, dtype=torch.int32, device=device),
            logits_indices=None if is_decode else ends.to(device),
            is_decode=is_decode,
            is_fresh_prefill=fresh,
            split=split,
        )


@dataclass
class MixedSplit:
    """A mixed step's decode rows (one query each: the paged decode kernel) and the rest (prefill
    chunks), each with the token rows and metadata of its sequences. Rows are a slice where a part's
    sequences are adjacent (the engine puts a mixed step's decodes first): views, not gathers, and the
    parts' outputs are copied into place rather than scattered."""

    decode_rows: slice | torch.Tensor  # each decoding sequence's query row
    decode: AttentionMetadata
    rest_rows: slice | torch.Tensor
    rest: AttentionMetadata

    @staticmethod
    def build(block_tables, query_lens, context_lens, block_size, device) -> MixedSplit:
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        dec = [i for i, q in enumerate(query_lens) if q == 1]
        rest = [i for i, q in enumerate(query_lens) if q != 1]

        def part(seqs):
            meta = AttentionMetadata.build(
                [block_tables[i] for i in seqs], [query_lens[i] for i in seqs], [context_lens[i] for i in seqs], block_size, device
            )
            if seqs == list(range(seqs[0], seqs[-1] + 1)):  # adjacent sequences: adjacent rows
                return slice(starts[seqs[0]], starts[seqs[-1] + 1]), meta
            rows = [t for i in seqs for t in range(starts[i], starts[i + 1])]
            return torch.tensor(rows, dtype=torch.long, device=device), meta

        (dr, dm), (rr, rm) = part(dec), part(rest)
        return MixedSplit(dr, dm, rr, rm)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter new keys/values [num_tokens, kv_heads, head_dim] into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim]. One sequence at a time."""
    out = torch.empty_like(q)
    bs = meta.block_size
    start = 0
    for i, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        n_blocks = (ctx + bs - 1) // bs
        blocks = meta.block_tables[i, :n_blocks].long()
        k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:ctx]
        v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:ctx]
        qi = q[start : start + qlen].transpose(0, 1)  # [H, qlen, D]
        ki, vi = k.transpose(0, 1), v.transpose(0, 1)  # [KVH, ctx, D]
        group = qi.shape[0] // ki.shape[0]
        if group > 1:
            ki = ki.repeat_interleave(group, dim=0)
            vi = vi.repeat_interleave(group, dim=0)
        # Query j sits at absolute position ctx - qlen + j and sees keys 0..that position.
        if q.is_cuda:  # the same mask as a bias the fused (memory-efficient) kernel takes, on 4-D inputs
            from torch.nn.attention.bias import causal_lower_right  # imports torch._dynamo (~1.2 s a process): only here

            bias = causal_lower_right(qlen, ctx)
            o = F.scaled_dot_product_attention(qi[None], ki.to(qi.dtype)[None], vi.to(qi.dtype)[None], attn_mask=bias, scale=scale)[0]
        else:
            q_pos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos
            o = F.scaled_dot_product_attention(qi, ki.to(qi.dtype), vi.to(qi.dtype), attn_mask=mask, scale=scale)
        out[start : start + qlen] = o.transpose(0, 1)
        start += qlen
    return out


def prefill_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Fresh prefill (no earlier KV): causal attention over each sequence's own new keys (flash SDPA on GPU).

    Sequences of equal length go through one batched call.
    """
    group = q.shape[1] // k.shape[1]
    if meta._length_groups is None:
        meta._length_groups = _length_groups(meta.query_lens, q.device)
    out = None
    for n, count, idx in meta._length_groups:
        # idx None: every row, in order (sequences of one length): no gather or scatter
        qi, ki, vi = (t if idx is None else t[idx] for t in (q, k, v))
        qi, ki, vi = (t.view(count, n, *t.shape[1:]).transpose(1, 2) for t in (qi, ki, vi))
        if group > 1:
            ki, vi = ki.repeat_interleave(group, dim=1), vi.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(1, 2).reshape(-1, *q.shape[1:])
        if idx is None:
            return o
        if out is None:
            out = torch.empty_like(q)
        out[idx] = o
    return out


def _length_groups(query_lens: list[int], device: torch.device) -> list[tuple[int, int, Optional[torch.Tensor]]]:
    """(length, sequences, their rows) per distinct length; rows None when one length covers every row."""
    if len(set(query_lens)) == 1:
        return [(query_lens[0], len(query_lens), None)]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(query_lens):
        by_len.setdefault(n, []).append(starts[i])
    rows = {n: [b + j for b in begins for j in range(n)] for n, begins in by_len.items()}
    flat = torch.tensor([r for n in by_len for r in rows[n]], dtype=torch.long).to(device)  # one copy for every group
    groups, at = [], 0
    for n, begins in by_len.items():
        groups.append((n, len(begins), flat[at : at + n * len(begins)]))
        at += n * len(begins)
    return groups


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Entry point the models call (K/V of the new tokens already written to the cache).

    CUDA: Triton paged kernel for decode; prompts and chunks through one flash varlen call (or, without it,
    flash SDPA per prompt length for fresh prefill). Elsewhere: the reference.
    """
    if q.is_cuda:
        if meta.is_decode:
            from epd.kernels.triton_decode import paged_decode

            return paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens_t, scale)
        if meta.split is not None:  # decodes through the decode kernel, not one by one beside the chunks
            return split_attention(q, k, v, k_cache, v_cache, meta.split, scale, paged_attention)
        if meta.varlen is not None and usable(q, q.shape[-1]):  # every prompt and chunk in one flash call
            return varlen_prefill(q, k, v, k_cache, v_cache, meta.varlen, scale)
        if meta.is_fresh_prefill:
            return prefill_attention_sdpa(q, k, v, meta, scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)


def split_attention(q, k, v, k_cache, v_cache, split: MixedSplit, scale: float, attend) -> torch.Tensor:
    """A mixed step as its two parts, each through `attend` (the entry point: the kernels on GPU)."""
    out = torch.empty_like(q)
    for rows, meta in ((split.decode_rows, split.decode), (split.rest_rows, split.rest)):
        out[rows] = attend(q[rows], k[rows], v[rows], k_cache, v_cache, meta, scale)
    return out
