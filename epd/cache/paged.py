"""Worker-side helpers that move rows in and out of block-structured tensors."""

from __future__ import annotations

import numpy as np
import torch


def row_index_many(parts: list[tuple[list[int], int]], block_tokens: int, device: torch.device) -> torch.Tensor:
    """The flat cache rows of several block lists (the first n rows of each), in order, as one index.

    Built on the host and sent in one pinned, non-blocking copy: a `torch.tensor(list, device=cuda)` per
    list would wait for the stream (the batch's kernels) each time and hand the interpreter to the
    preparation threads in between.
    """
    offsets = np.arange(block_tokens, dtype=np.int64)
    idx = np.concatenate([(np.asarray(b, dtype=np.int64)[:, None] * block_tokens + offsets).ravel()[:n] for b, n in parts])
    host = torch.from_numpy(idx)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def row_index(blocks: list[int], block_tokens: int, n: int, device: torch.device) -> torch.Tensor:
    return row_index_many([(blocks, n)], block_tokens, device)


def write_rows(cache: torch.Tensor, blocks: list[int], rows: torch.Tensor) -> None:
    """cache [blocks, block_tokens, hidden]; rows [n, hidden] go to the first n slots of `blocks`."""
    write_rows_many(cache, [(blocks, rows)])


def write_rows_many(cache: torch.Tensor, parts: list[tuple[list[int], torch.Tensor]]) -> None:
    """Each (blocks, rows [n, hidden]) written to the first n slots of its blocks: one index, one copy."""
    if not parts:
        return
    idx = row_index_many([(b, r.shape[0]) for b, r in parts], cache.shape[1], cache.device)
    rows = parts[0][1] if len(parts) == 1 else torch.cat([r for _, r in parts])
    cache.view(-1, cache.shape[-1]).index_copy_(0, idx, rows.to(cache.device, cache.dtype))


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
