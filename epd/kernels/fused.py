"""Elementwise pieces of a decoder layer (RMSNorm, rotary, SiLU-gate, the q/k/v split with its cache
write) and of a vision tower (CLIP's quick-GELU), fused on CUDA.

Eager PyTorch runs each of these as several kernels; in a 7B decode step at batch 1 those small
launches cost as much as reading the weights. On CUDA the q/k/v pass and the SiLU-gate are Triton
kernels (`triton_elementwise`: they move their bytes near the card's bandwidth, where the compiled
versions did not), RMSNorm and a lone rotary are compiled (torch.compile fuses each into one kernel);
EPD_TRITON_ELEMENTWISE=0 keeps the compiled versions for all; elsewhere, and with EPD_COMPILE=0, the
plain definitions run.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from epd.kernels.attention import write_kv


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def quick_gelu_ref(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_COMPILED: dict[str, object] = {}


def _fast(name: str, fn):
    if os.environ.get("EPD_COMPILE", "1") == "0":
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[name]


def _triton():
    """The Triton elementwise kernels, or None where they are switched off or Triton is absent."""
    if os.environ.get("EPD_COMPILE", "1") == "0" or os.environ.get("EPD_TRITON_ELEMENTWISE", "1") == "0":
        return None
    try:
        from epd.kernels import triton_elementwise
    except ImportError:
        return None
    return triton_elementwise


def rope_qkv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection's output [tokens, (heads + 2 kv_heads) * head_dim] -> q, k, v [tokens, heads, head_dim]
    with q and k rotated; k and v also written to their cache slots. `out`: where to put q, k and v."""
    n = qkv.shape[0]
    kernels = _triton() if qkv.is_cuda else None
    if kernels is not None:
        if out is None:
            new = qkv.new_empty
            out = (new(n, heads, head_dim), new(n, kv_heads, head_dim), new(n, kv_heads, head_dim))
        return kernels.rope_qkv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads, out)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = rotary(q.reshape(n, heads, head_dim), cos, sin)
    k = rotary(k.reshape(n, kv_heads, head_dim), cos, sin)
    return place_qkv(q, k, v.reshape(n, kv_heads, head_dim), k_cache, v_cache, slots, out)


def place_qkv(q, k, v, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, out=None) -> tuple[torch.Tensor, ...]:
    """Rotated q, k and v where they go: k and v to their cache slots, all three into `out` where given."""
    write_kv(k, v, k_cache, v_cache, slots)
    if out is None:
        return q, k, v
    for dst, src in zip(out, (q, k, v)):
        dst.copy_(src)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _fast("rms_norm", rms_norm_ref)(x, weight, eps) if x.is_cuda else rms_norm_ref(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _fast("rotary", rotary_ref)(x, cos, sin) if x.is_cuda else rotary_ref(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    kernels = _triton() if gate_up.is_cuda else None
    if kernels is not None:
        return kernels.silu_mul(gate_up)
    return _fast("silu_mul", silu_mul_ref)(gate_up) if gate_up.is_cuda else silu_mul_ref(gate_up)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    kernels = _triton() if x.is_cuda else None
    return kernels.quick_gelu(x) if kernels is not None else quick_gelu_ref(x)


class QuickGELU(torch.nn.Module):
    """CLIP's `quick_gelu` activation, one Triton pass on CUDA (a 32-image CLIP-L tower spent 5.9 of its 32 ms in
    the three eager kernels); the plain definition elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)
