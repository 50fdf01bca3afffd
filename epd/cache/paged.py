"""Worker-side helpers that move rows in and out of block-structured tensors."""

from __future__ import annotations

import torch


def row_index(blocks: list[int], block_tokens: int, n: int, device: torch.device) -> torch.Tensor:
    b = torch.tensor(blocks, dtype=torch.long, device=device)
    return (b[:, None] * block_tokens + torch.arange(block_tokens, device=device)[None, :]).flatten()[:n]


def write_rows(cache: torch.Tensor, blocks: list[int], rows: torch.Tensor) -> None:
    """cache [blocks, block_tokens, hidden]; rows [n, hidden] go to the first n slots of `blocks`."""
    idx = row_index(blocks, cache.shape[1], rows.shape[0], cache.device)
    cache.view(-1, cache.shape[-1]).index_copy_(0, idx, rows.to(cache.dtype))


def read_rows(cache: torch.Tensor, blocks: list[int], n: int) -> torch.Tensor:
    return cache.view(-1, cache.shape[-1])[row_index(blocks, cache.shape[1], n, cache.device)]


def gather_kv(kv: torch.Tensor, blocks: list[int], n_tokens: int) -> torch.Tensor:
    """The first n_tokens of a sequence's KV in every layer, [layers, 2, n_tokens, kv_heads, head_dim].

    Token rows, not blocks, so sender and receiver may use different block sizes.
    """
    flat = kv.view(kv.shape[0], 2, -1, *kv.shape[4:])
    return flat[:, :, row_index(blocks, kv.shape[3], n_tokens, kv.device)]


def scatter_kv(kv: torch.Tensor, blocks: list[int], data: torch.Tensor) -> None:
    flat = kv.view(kv.shape[0], 2, -1, *kv.shape[4:])
    flat.index_copy_(2, row_index(blocks, kv.shape[3], data.shape[2], kv.device), data.to(kv.device, kv.dtype))
