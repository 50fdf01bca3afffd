"""The vision tower by tile count from CUDA graphs: batches cut into captured sizes give the eager tower's
embeddings (on CPU the pieces run eagerly; on a GPU the capture itself, and that a batch's result is not
overwritten by the next replay)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import tiny_model_config
from test_qwen2_vl import tiny as tiny_qwen

from epd.images import load_image
from epd.models.runtime import ModelRuntime
from epd.models.tower_graphs import graph_sizes, pieces
from epd.request import ImageInput


@pytest.mark.parametrize("max_tiles", [1, 3, 8, 9, 32, 104])
def test_every_batch_is_cut_into_captured_sizes_without_padding(max_tiles):
    sizes = graph_sizes(max_tiles)
    assert sizes[0] == 1 and sizes[-1] == max_tiles and len(sizes) <= 8 + max_tiles // 8 + 1
    for n in range(1, 3 * max_tiles + 20):
        cut = pieces(n, sizes)
        assert sum(cut) == n and all(s in sizes for s in cut)
        assert cut == sorted(cut, reverse=True)
        # whole pieces of the largest size, then at most one multiple of 8 and one remainder below 8
        assert len(cut) <= n // max_tiles + 2


def test_a_tower_graph_needs_a_tile():
    with pytest.raises(ValueError, match="max_tiles >= 1"):
        graph_sizes(0)


def _pixels(rt: ModelRuntime, n_images: int, width: int) -> list[torch.Tensor]:
    return [rt.family.preprocess(load_image(ImageInput(width=width + 37 * i, height=300, seed=i))) for i in range(n_images)]


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("max_tiles", [1, 5, 16])
def test_pieces_give_the_eager_towers_embeddings(family, max_tiles):
    rt = ModelRuntime(tiny_model_config(family), {"vision"}, "cpu")
    batches = [_pixels(rt, n, 200 if family == "llava" else 900) for n in (1, 3, 7)]
    eager = [rt.encode(b) for b in batches]
    assert rt.capture_tower_graphs(max_tiles, capture=False)
    for batch, want in zip(batches, eager):
        got = rt.encode(batch)
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_native_resolution_towers_keep_their_own_batching():
    rt = ModelRuntime(tiny_qwen("qwen2_vl"), {"vision"}, "cpu")
    assert not rt.capture_tower_graphs(8, capture=False) and rt.tower_graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_replayed_tower_equals_the_eager_one_and_keeps_its_results(family):
    rt = ModelRuntime(tiny_model_config(family), {"vision"}, "cuda")
    batches = [_pixels(rt, n, 200 if family == "llava" else 900) for n in (1, 2, 5, 9)]
    eager = [rt.encode(b) for b in batches]
    assert rt.capture_tower_graphs(8)
    got = [rt.encode(b) for b in batches]  # each batch kept while later ones replay the same graphs
    for g_batch, w_batch in zip(got, eager):
        for g, w in zip(g_batch, w_batch):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_tiles,thumbnail", [(1, True), (6, True), (6, False), (12, True)])
def test_no_image_makes_more_tiles_than_the_family_says(max_tiles, thumbnail):
    """The worker captures graphs up to max_images_per_batch x max_tiles_per_image: no image may exceed it."""
    cfg = dataclasses.replace(tiny_model_config("internvl"), max_tiles=max_tiles, use_thumbnail=thumbnail)
    rt = ModelRuntime(cfg, {"vision"}, "cpu")
    most = max(rt.family.preprocess(load_image(ImageInput(width=w, height=h, seed=1))).shape[0] for w, h in
               [(448, 448), (4032, 3024), (3000, 200), (200, 3000), (1000, 1000), (900, 450)])  # fmt: skip
    assert most <= rt.family.max_tiles_per_image
    assert ModelRuntime(tiny_model_config("llava"), {"vision"}, "cpu").family.max_tiles_per_image == 1
