"""Piecewise step graphs: the layers cut at attention and padded to a bucket give the monolithic forward's
logits (on CPU the pieces run eagerly; the GPU capture is checked by bench/mixed_step.py --check)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import tiny_model_config

from epd.models.generate import lm_step
from epd.models.runtime import ModelRuntime
from epd.models.step_graphs import StepGraphs, bucket_sizes


@pytest.fixture(scope="module", params=["llava", "internvl"])
def runtime(request):
    return ModelRuntime(tiny_model_config(request.param), {"lm"}, "cpu")


def _step(rt, kinds, seed):
    """Sequences of each kind: ('fresh', n) prefill, ('chunk', ctx, n) after earlier KV, ('decode', ctx)."""
    rng = random.Random(seed)
    tokens, starts, tables, nxt = [], [], [], 0
    for kind in kinds:
        ctx = 0 if kind[0] == "fresh" else kind[1]
        n = {"fresh": kind[-1], "chunk": kind[-1], "decode": 1}[kind[0]]
        need = -(-(ctx + n) // 4)
        tables.append(list(range(nxt, nxt + need))[::-1])
        nxt += need
        tokens.append([rng.randrange(10, 200) for _ in range(n)])
        starts.append(ctx)
    return tokens, starts, tables, nxt


@pytest.mark.parametrize(
    "kinds",
    [
        [("fresh", 13)],
        [("fresh", 5), ("fresh", 9), ("fresh", 5)],
        [("chunk", 11, 6)],
        [("decode", 7), ("decode", 20), ("chunk", 9, 17)],
        [("decode", 3)] * 5 + [("chunk", 4, 3), ("chunk", 30, 8)],
        [("decode", 12), ("decode", 5)],
    ],
)
def test_pieces_padded_to_a_bucket_give_the_forwards_logits(runtime, kinds):
    rt = runtime
    tokens, starts, tables, used = _step(rt, kinds, seed=len(kinds))
    kv_a, kv_b = rt.allocate_kv_cache(used + 1, 4), rt.allocate_kv_cache(used + 1, 4)
    # earlier KV of chunks and decodes: the same random contents in both caches
    kv_a.copy_(torch.randn(kv_a.shape, generator=torch.Generator().manual_seed(1)))
    kv_b.copy_(kv_a)
    n = sum(len(t) for t in tokens)
    graphs = StepGraphs(rt.lm, kv_b, 4, used, (max(1, n // 2), n + 3), capture=False)
    assert min(s for s in graphs.sizes if s >= n) > n  # the step is padded
    want = lm_step(rt, kv_a, tokens, starts, tables, 4)
    got = lm_step(rt, kv_b, tokens, starts, tables, 4, graphs=graphs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv_b[:, :, :used], kv_a[:, :, :used])  # padded rows wrote only the scratch block


def test_a_step_with_image_rows_through_the_pieces():
    rt = ModelRuntime(tiny_model_config("llava"), {"lm"}, "cpu")
    img = rt.family.image_token_id
    prompt = [1, 5, img, img, img, 6, 7]
    mm = torch.randn(3, rt.hidden_size, generator=torch.Generator().manual_seed(3))
    graphs = StepGraphs(rt.lm, rt.allocate_kv_cache(5, 4), 4, 4, (8, 16), capture=False)
    want = lm_step(rt, rt.allocate_kv_cache(5, 4), [prompt], [0], [[0, 1]], 4, [mm], [len(prompt)])
    got = lm_step(rt, graphs.kv, [prompt], [0], [[0, 1]], 4, [mm], [len(prompt)], graphs=graphs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_m_rope_positions_through_the_pieces():
    """Qwen2-VL: [3, tokens] rotary positions in the padded buffers give the forward's logits."""
    from test_qwen2_vl import tiny

    rt = ModelRuntime(tiny("qwen2_vl"), {"lm"}, "cpu")
    fam = rt.family
    prompt = fam.build_prompt([40, 41], [(120, 90)])
    layout = fam.rope_layout(prompt, [(120, 90)])
    n_img = prompt.count(fam.image_token_id)
    mm = torch.randn(n_img, rt.hidden_size, generator=torch.Generator().manual_seed(3))
    blocks = -(-len(prompt) // 4)
    graphs = StepGraphs(rt.lm, rt.allocate_kv_cache(blocks + 1, 4), 4, blocks, (8, len(prompt) + 5), capture=False)
    args = ([prompt], [0], [list(range(blocks))], 4, [mm], [len(prompt)])
    want = lm_step(rt, rt.allocate_kv_cache(blocks + 1, 4), *args, rope=[layout])
    got = lm_step(rt, graphs.kv, *args, graphs=graphs, rope=[layout])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    plain = lm_step(rt, rt.allocate_kv_cache(blocks + 1, 4), *args)  # the positions matter
    assert (plain - want).abs().max() > 1e-3


def test_bucket_sizes_cover_every_count_with_bounded_padding():
    for top in (1, 7, 100, 512, 513, 2048, 2176, 8192):
        sizes = bucket_sizes(top)
        assert sizes == tuple(sorted(set(sizes))) and sizes[-1] >= top
        for n in range(1, top + 1, 37):
            b = min(s for s in sizes if s >= n)
            assert b <= max(8, 2 * n) and (n <= 512 or b - n < 256)


def test_step_graphs_refuse_a_sharded_model():
    rt = ModelRuntime(tiny_model_config("llava"), {"lm"}, "cpu")
    rt.lm.tp = 2
    with pytest.raises(ValueError, match="tp=1"):
        StepGraphs(rt.lm, rt.allocate_kv_cache(3, 4), 4, 2, (8,), capture=False)
