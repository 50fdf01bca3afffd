"""The offsets and context slots a CUDA prefill step hands to the flash varlen call, built on the host here."""

from __future__ import annotations

import random

import pytest
import torch

from epd.kernels.varlen_prefill import VarlenLayout


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_context_slots_walk_each_sequence_through_its_block_table(seed, block_size):
    rnd = random.Random(seed)
    seqs = rnd.randint(1, 9)
    ctx = [rnd.randint(1, 300) for _ in range(seqs)]
    qlens = [rnd.randint(1, c) for c in ctx]
    free = list(range(2000))
    rnd.shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // block_size))] for c in ctx]
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    layout = VarlenLayout(qlens, ctx, padded, block_size, fresh=False)
    want = [t[p // block_size] * block_size + p % block_size for t, c in zip(tables, ctx) for p in range(c)]
    assert layout.context_slots.tolist() == want
    assert layout.cu_q.tolist() == [sum(qlens[:i]) for i in range(seqs + 1)]
    assert layout.cu_k.tolist() == [sum(ctx[:i]) for i in range(seqs + 1)]
    assert (layout.max_q, layout.max_k) == (max(qlens), max(ctx))


def test_a_fresh_step_reads_its_own_rows_and_gathers_nothing():
    layout = VarlenLayout([3, 5], [3, 5], torch.tensor([[0], [1]], dtype=torch.int32), 16, fresh=True)
    assert layout.context_slots is None
    assert layout.cu_k is layout.cu_q
