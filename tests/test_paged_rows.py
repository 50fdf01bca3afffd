"""Rows in and out of block-structured caches: one index and one copy for many block lists gives what a
copy per list gave."""

import random

import pytest
import torch

from epd.cache.paged import read_rows, row_index, row_index_many, write_rows, write_rows_many

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_tokens", [1, 16, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_lists_in_one_write_equal_one_write_each(device, block_tokens, seed):
    rng = random.Random(seed)
    blocks, hidden = 96, 8
    free = list(range(blocks))
    rng.shuffle(free)
    parts = []
    for _ in range(rng.randint(1, 6)):
        rows = rng.randint(1, 3 * block_tokens + 1)
        need = -(-rows // block_tokens)
        if need > len(free):
            break
        mine, free = free[:need], free[need:]
        parts.append((mine, torch.randn(rows, hidden, dtype=torch.float32)))
    one = torch.zeros(blocks, block_tokens, hidden, device=device)
    each = torch.zeros_like(one)
    write_rows_many(one, [(b, r.to(device)) for b, r in parts])
    for b, r in parts:
        write_rows(each, b, r.to(device))
    assert torch.equal(one, each)
    for b, r in parts:
        assert torch.equal(read_rows(one, b, r.shape[0]).cpu(), r)
    idx = row_index_many([(b, r.shape[0]) for b, r in parts], block_tokens, torch.device(device))
    assert idx.device.type == device and idx.dtype == torch.long
    assert torch.equal(idx.cpu(), torch.cat([row_index(b, block_tokens, r.shape[0], torch.device("cpu")) for b, r in parts]))


def test_rows_arrive_in_the_cache_dtype_and_nothing_is_written_for_no_parts():
    cache = torch.zeros(4, 16, 8, dtype=torch.bfloat16)
    write_rows_many(cache, [])
    assert not cache.any()
    rows = torch.randn(20, 8, dtype=torch.float32)
    write_rows(cache, [3, 1], rows)
    assert torch.equal(read_rows(cache, [3, 1], 20), rows.to(torch.bfloat16))
    assert not cache[0].any() and not cache[2].any() and not cache[1, 4:].any()
