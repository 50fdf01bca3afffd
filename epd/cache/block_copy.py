"""Copy whole cache blocks between two cache tensors of the same layout.

The csrc extension does it in one memcpy per run (CPU) or one kernel launch (CUDA, also from a
peer GPU's memory opened by IPC); without it, the same copy in torch ops, one per run.
"""

from __future__ import annotations

from typing import Optional

import torch

from epd.csrc import block_ops


def block_runs(src_blocks: list[int], dst_blocks: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive (src, dst) pairs merged into (src_start, dst_start, count) runs."""
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(f"copy_blocks: {len(src_blocks)} source blocks but {len(dst_blocks)} destination blocks")
    runs: list[list[int]] = []
    for s, d in zip(src_blocks, dst_blocks):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


def copy_blocks_torch(src: torch.Tensor, dst: torch.Tensor, src_blocks: list[int], dst_blocks: list[int], block_dim: int) -> None:
    for s, d, n in block_runs(src_blocks, dst_blocks):
        dst.narrow(block_dim, d, n).copy_(src.narrow(block_dim, s, n), non_blocking=True)


def copy_blocks(
    src: torch.Tensor, dst: torch.Tensor, src_blocks: list[int], dst_blocks: list[int], block_dim: int, ops: Optional[object] = None
) -> None:
    """dst[..., dst_blocks[i], ...] = src[..., src_blocks[i], ...] along `block_dim`."""
    if not src_blocks:
        return
    ops = block_ops() if ops is None else ops
    if ops is not None and src.device.type == "cpu" and dst.device.type == "cpu":
        ops.copy_blocks_cpu(src, dst, src_blocks, dst_blocks, block_dim)
    elif ops is not None and dst.device.type == "cuda" and src.device == dst.device and ops.has_cuda():
        ops.copy_blocks_cuda(src.data_ptr(), src.shape[block_dim], dst, src_blocks, dst_blocks, block_dim)
    else:
        copy_blocks_torch(src, dst, src_blocks, dst_blocks, block_dim)
