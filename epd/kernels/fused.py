"""Elementwise pieces of a decoder layer (RMSNorm, rotary, SiLU-gate), fused on CUDA.

Eager PyTorch runs each of these as several kernels; in a 7B decode step at batch 1 those small
launches cost as much as reading the weights. On CUDA they are compiled (torch.compile fuses each
into one kernel); elsewhere, and with EPD_COMPILE=0, the plain definitions run.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


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


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _fast("rms_norm", rms_norm_ref)(x, weight, eps) if x.is_cuda else rms_norm_ref(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _fast("rotary", rotary_ref)(x, cos, sin) if x.is_cuda else rotary_ref(x, cos, sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _fast("silu_mul", silu_mul_ref)(gate_up) if gate_up.is_cuda else silu_mul_ref(gate_up)
