"""Every prompt of a prefill step in one flash varlen call (torch.nn.attention.varlen).

Without it a step of many prompts runs one attention per distinct prompt length, and a step holding
one continued chunk beside fresh prompts runs one per sequence (gathering its context first): with
~27 prompts a step and 32 layers that is hundreds of small launches issued between the step's graph
pieces. Here the queries of all sequences go in one call; keys and values are this step's own rows
when every sequence is fresh, otherwise every sequence's whole context gathered from the paged cache
in one index_select (the new rows are written there before attention). Causal masking is aligned to
the bottom right (query j of a chunk of q sees the first ctx - q + j + 1 keys), as flash defines it.

Used on CUDA for half-precision caches where torch provides the call; elsewhere the engine keeps the
grouped SDPA and per-sequence paths.
"""

from __future__ import annotations

import inspect
import os
from functools import lru_cache
from typing import Optional

import torch


@lru_cache(maxsize=1)
def _varlen():
    """(varlen_attn, keyword arguments that make it causal, whether it takes enable_gqa) or None."""
    if os.environ.get("EPD_VARLEN", "1") == "0":
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def varlen_available() -> bool:
    return _varlen() is not None


def usable(q: torch.Tensor, head_dim: int) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


class VarlenLayout:
    """A step's cumulative query and key offsets, and (for steps with earlier KV) the cache slots of every
    sequence's context in order: made once per step on the device, read by every layer."""

    def __init__(self, query_lens: list[int], context_lens: list[int], block_tables: torch.Tensor, block_size: int, fresh: bool):
        dev = block_tables.device
        self.max_q, self.max_k = max(query_lens), max(context_lens)
        self.cu_q = _cumulative(query_lens, dev)
        self.cu_k = self.cu_q if fresh else _cumulative(context_lens, dev)
        self.context_slots: Optional[torch.Tensor] = None
        if not fresh:
            total = sum(context_lens)
            ctx = torch.tensor(context_lens, dtype=torch.long).to(dev, non_blocking=True)
            seq = torch.repeat_interleave(torch.arange(len(context_lens), device=dev), ctx, output_size=total)
            pos = torch.arange(total, device=dev) - self.cu_k[:-1].long()[seq]
            self.context_slots = block_tables[seq, pos // block_size].long() * block_size + pos % block_size


def _cumulative(lens: list[int], dev: torch.device) -> torch.Tensor:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32).to(dev, non_blocking=True)


def varlen_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: VarlenLayout, scale: float
) -> torch.Tensor:
    """q [tokens, heads, d]; k, v [tokens, kv_heads, d] (this step's rows, already in the cache) -> [tokens, heads, d]."""
    fn, causal, takes_gqa = _varlen()
    if layout.context_slots is not None:
        k = k_cache.view(-1, *k_cache.shape[2:]).index_select(0, layout.context_slots)
        v = v_cache.view(-1, *v_cache.shape[2:]).index_select(0, layout.context_slots)
    k, v = k.to(q.dtype), v.to(q.dtype)
    group = q.shape[1] // k.shape[1]
    extra = dict(causal)
    if group > 1:
        if takes_gqa:
            extra["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return fn(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k, scale=scale, **extra)
