"""The Triton paged decode kernel on CUDA (skipped elsewhere): equal to the reference attention for batch
sizes that change its split count and block tables of widths Triton would specialise on (1, multiples of
16, others), compiled once per split count: a served step never waits for a compilation its shapes'
strides would otherwise cause."""

from __future__ import annotations

import pytest
import torch

from epd.kernels.attention import AttentionMetadata, paged_attention_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")


def _compiled(kernel) -> int:
    """Kernels compiled so far for a Triton function (its per-device caches)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    return sum(len(c[0]) for c in caches.values())


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 32, 128), (28, 4, 128)])
def test_paged_decode_equals_the_reference_and_compiles_once_per_split_count(heads, kv_heads, head_dim):
    from epd.kernels import triton_decode

    torch.manual_seed(0)
    dev, bs, blocks = torch.device("cuda"), 16, 2048
    k_cache = torch.randn(blocks, bs, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    scale = head_dim**-0.5
    from epd.kernels.compilations import compiled_so_far

    before, counted_before = _compiled(triton_decode._decode_partial), compiled_so_far()
    for batch in (1, 3, 5, 17):
        for width in (1, 16, 17, 40):
            ctx = [max(1, min(width * bs, 5 + 13 * i + width * 7)) for i in range(batch)]
            # tables `width` entries wide (those past a sequence's context unused): the kernel's row stride
            tables = [[(i * width + j) % blocks for j in range(width)] for i in range(batch)]
            meta = AttentionMetadata.build(tables, [1] * batch, ctx, bs, dev)
            assert meta.block_tables.stride(0) == width
            q = torch.randn(batch, heads, head_dim, device=dev, dtype=torch.bfloat16)
            got = triton_decode.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens_t, scale)
            want = paged_attention_ref(q, k_cache, v_cache, meta, scale)
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    import triton

    splits = {min(16, triton.next_power_of_2(max(1, 528 // (b * kv_heads)))) for b in (1, 3, 5, 17)}  # the kernel's own rule
    assert _compiled(triton_decode._decode_partial) - before <= len(splits)
    # what a worker counts around its batches sees them (and the merge kernel's, one per split count too)
    assert compiled_so_far() - counted_before >= _compiled(triton_decode._decode_partial) - before
