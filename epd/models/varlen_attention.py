"""Packed vision attention without a launch per image: the sequences of a packed batch grouped by length.

transformers' native-resolution towers (Qwen2-VL, MiniCPM-V) pack a batch's images into one sequence
with `cu_seqlens`; without flash-attention's varlen kernel they run one attention per image (or per
window), hundreds of small launches that leave the GPU idle. Registered as an attention
implementation whose name asks for the varlen path, this runs one SDPA per distinct length instead:
equal-length sequences (a batch's slices, a window grid) stacked into a batch. Same mathematics as
attending per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

NAME = "epd_flash_varlen"  # "flash" in the name routes transformers' towers through the cu_seqlens path


def grouped_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, head_dim], the batch's sequences one after another
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask=None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """-> ([1, tokens, heads, head_dim], None), bidirectional attention within each sequence."""
    if attention_mask is not None or is_causal or cu_seq_lens_q is None:
        raise ValueError(f"{NAME} takes packed bidirectional attention over cu_seqlens only")
    q, k, v = query[0], key[0], value[0]  # [heads, tokens, d]
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    starts = cu_seq_lens_q[:-1].tolist()
    out = torch.empty(q.shape[1], q.shape[0], v.shape[-1], dtype=v.dtype, device=v.device)  # [tokens, heads, d]
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n:
            by_length.setdefault(n, []).append(starts[i])
    for n, begins in by_length.items():
        if len(begins) > 1 and begins == list(range(begins[0], begins[0] + n * len(begins), n)):  # contiguous: a view
            lo, hi = begins[0], begins[0] + n * len(begins)
            qs, ks, vs = (t[:, lo:hi].unflatten(1, (len(begins), n)).transpose(0, 1) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=scaling)  # [seqs, heads, n, d]
            out[lo:hi] = o.permute(0, 2, 1, 3).reshape(-1, *o.shape[1:2], o.shape[-1])
            continue
        idx = (torch.tensor(begins, device=q.device)[:, None] + torch.arange(n, device=q.device)).flatten()
        qs, ks, vs = (t[:, idx].unflatten(1, (len(begins), n)).transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scaling)
        out[idx] = o.permute(0, 2, 1, 3).reshape(-1, o.shape[1], o.shape[-1])
    return out[None], None


AttentionInterface.register(NAME, grouped_varlen_attention)


def use_grouped_varlen(tower: nn.Module) -> nn.Module:
    """Route a transformers tower's packed attention through `grouped_varlen_attention`."""
    tower.config._attn_implementation = NAME
    return tower
