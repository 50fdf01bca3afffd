"""Paged attention over a block-table KV cache: torch reference for prefill and decode.

Cache layout per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].
A token's slot is block_id * block_size + offset. A sequence's keys are the first `context_len`
slots of its block table; its queries are the last `query_len` of those positions (causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: where each new token's K/V is written
    query_lens: list[int]  # new tokens per sequence (1 for decode)
    context_lens: list[int]  # total tokens per sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] long (padded with 0)
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def logits_indices(self) -> torch.Tensor:
        """The last new token of each sequence: the only positions that need logits."""
        ends = torch.tensor(self.query_lens, dtype=torch.long).cumsum(0) - 1
        return ends.to(self.slot_mapping.device)

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
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_tables=torch.tensor(padded, dtype=torch.long, device=device),
            block_size=block_size,
        )


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
        blocks = meta.block_tables[i, :n_blocks]
        k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:ctx]
        v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:ctx]
        qi = q[start : start + qlen].transpose(0, 1)  # [H, qlen, D]
        ki, vi = k.transpose(0, 1), v.transpose(0, 1)  # [KVH, ctx, D]
        group = qi.shape[0] // ki.shape[0]
        if group > 1:
            ki = ki.repeat_interleave(group, dim=0)
            vi = vi.repeat_interleave(group, dim=0)
        # Query j sits at absolute position ctx - qlen + j and sees keys 0..that position.
        q_pos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos
        o = F.scaled_dot_product_attention(qi, ki.to(qi.dtype), vi.to(qi.dtype), attn_mask=mask, scale=scale)
        out[start : start + qlen] = o.transpose(0, 1)
        start += qlen
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Entry point the models call; fast kernels plug in here for CUDA tensors."""
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)
