"""The fused q/k/v pass (rotary, cache write) and SiLU-gate against their plain torch definitions.

On CUDA the Triton kernels run (the GPU machine runs these); on the host the plain path, whose `out` form
must equal its returning form."""

from __future__ import annotations

import pytest
import torch

from epd.kernels import fused
from epd.kernels.attention import write_kv

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference(qkv, cos, sin, kc, vc, slots, heads, kv_heads, d):
    n = qkv.shape[0]
    q, k, v = qkv.float().split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = fused.rotary_ref(q.reshape(n, heads, d), cos.float(), sin.float())
    k = fused.rotary_ref(k.reshape(n, kv_heads, d), cos.float(), sin.float())
    v = v.reshape(n, kv_heads, d)
    write_kv(k, v, kc, vc, slots)
    return q, k, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,d", [(32, 32, 128), (28, 4, 128), (16, 2, 64), (6, 2, 80)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_rope_qkv_rotates_and_writes_the_cache_like_the_plain_pieces(device, dtype, heads, kv_heads, d, tokens):
    g = torch.Generator().manual_seed(tokens + heads)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g).to(device, dtype)
    ang = torch.rand(tokens, d // 2, generator=g) * 6.0
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(device, dtype) for f in (torch.cos, torch.sin))
    blocks, bs = 64, 16
    slots = torch.randperm(blocks * bs, generator=g)[:tokens].to(device)
    kc, vc = (torch.zeros(blocks, bs, kv_heads, d, dtype=dtype, device=device) for _ in range(2))
    want_kc, want_vc = (torch.zeros(blocks, bs, kv_heads, d) for _ in range(2))
    want = _reference(qkv.cpu(), cos.cpu(), sin.cpu(), want_kc, want_vc, slots.cpu(), heads, kv_heads, d)
    got = fused.rope_qkv(qkv, cos, sin, kc, vc, slots, heads, kv_heads, d)
    tol = 1e-5 if dtype == torch.float32 else 0.06
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape, name
        assert (a.float().cpu() - b).abs().max() <= tol, name
    assert (kc.float().cpu() - want_kc).abs().max() <= tol and (vc.float().cpu() - want_vc).abs().max() <= tol
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert kc.view(-1, kv_heads, d)[untouched.to(device)].abs().max() == 0  # no other slot written
    bufs = tuple(torch.full_like(t, 7.0) for t in got)
    out = fused.rope_qkv(qkv, cos, sin, kc, vc, slots, heads, kv_heads, d, out=bufs)
    assert all(o is b for o, b in zip(out, bufs))
    assert all(torch.equal(o, t) for o, t in zip(out, got))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,width", [(1, 64), (5, 1000), (300, 11008), (3, 2049)])
def test_silu_mul_matches_the_plain_definition(device, dtype, tokens, width):
    x = torch.randn(tokens, 2 * width, generator=torch.Generator().manual_seed(width)) * 4
    want = fused.silu_mul_ref(x)
    got = fused.silu_mul(x.to(device, dtype))
    tol = 1e-5 if dtype == torch.float32 else 0.03
    assert got.shape == (tokens, width)
    assert ((got.float().cpu() - want).abs() / (1 + want.abs())).max() <= tol


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 577, 4096), (2, 5, 1000), (0, 16)])
def test_quick_gelu_matches_the_plain_definition(device, dtype, shape):
    from transformers.activations import QuickGELUActivation

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=g) * 4).to(device, dtype)
    want = QuickGELUActivation()(x.float())  # transformers' definition, in float32
    got = fused.QuickGELU()(x)
    assert got.shape == x.shape and got.dtype == dtype
    tol = 0 if device == "cpu" and dtype == torch.float32 else (1e-5 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_the_llava_tower_runs_the_fused_activation_and_gives_transformers_features():
    """The CLIP tower's quick-GELU modules are swapped for the fused one; on the host the features equal the
    tower built with transformers' own activation."""
    from helpers import MODEL
    from transformers.activations import QuickGELUActivation

    from epd.models.runtime import ModelRuntime

    rt = ModelRuntime(MODEL, {"vision"})
    acts = [m.activation_fn for m in rt.vision.modules() if hasattr(m, "activation_fn")]
    assert acts and all(isinstance(a, fused.QuickGELU) for a in acts)
    pixels = torch.randn(2, 3, MODEL.vision.image_size, MODEL.vision.image_size, generator=torch.Generator().manual_seed(0))
    got = rt.vision.encode(pixels.to(rt.dtype))
    for m in rt.vision.modules():
        if hasattr(m, "activation_fn"):
            m.activation_fn = QuickGELUActivation()
    torch.testing.assert_close(got, rt.vision.encode(pixels.to(rt.dtype)), rtol=0, atol=0)
