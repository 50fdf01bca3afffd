"""Pillow's bicubic resize, bit for bit, in torch: on any device, and for just the output pixels needed.

The transformers processors resize with Pillow (`Image.resize(..., BICUBIC)`), which resamples
separably — a horizontal pass, the result rounded to uint8, then a vertical pass — with filter
weights computed in double precision and then rounded to 22-bit fixed point. This module computes
the same weights (same operations, same order) and applies them as float64 matrix products: every
product and partial sum is an integer below 2^53, so the sums are exact whatever order the device
adds them in, and the result equals Pillow's exactly.

Two things Pillow cannot do come for free: it runs where the tensor lies (a GPU resizes a 12 MP
photo in about a millisecond), and `resize_crop` computes only the pixels of a crop of the resized
image — a 1x4000 image that CLIP's processor stretches to 336x1,344,000 before cropping never
exists in full.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import PIL
import torch

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images: 32 - 8 - 2
_A = -0.5  # Pillow's bicubic parameter
_SUPPORT = 2.0
_MIN_BLOCK, _MAX_BLOCK = 16, 512  # output pixels per matrix product: each block reads only its band of the input
_PILLOW_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def coefficients(in_size: int, out_size: int, start: int, stop: int) -> tuple[int, np.ndarray]:
    """Fixed-point weights of output pixels [start, stop) of an in_size -> out_size resize, as
    (first input pixel used, int64 matrix [stop - start, inputs used])."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xx = np.arange(start, stop, dtype=np.float64)
    center = 0.0 + (xx + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    valid = taps[None, :] < xmax[:, None]
    w = _bicubic(((taps[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5) * ss)
    w = np.where(valid, w, 0.0)
    ww = np.zeros(len(xx))
    for k in range(ksize):  # Pillow sums the weights one by one, in order
        ww = ww + w[:, k]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    fixed = np.where(valid, fixed, 0)
    lo = int(xmin.min()) if len(xx) else 0
    hi = int((xmin + np.maximum(xmax, 0)).max()) if len(xx) else 0
    dense = np.zeros((len(xx), max(hi - lo, 1)), dtype=np.int64)
    rows = np.repeat(np.arange(len(xx)), ksize).reshape(len(xx), ksize)
    cols = xmin[:, None] + taps[None, :] - lo
    keep = valid & (fixed != 0)
    dense[rows[keep], cols[keep]] = fixed[keep]
    return lo, dense


def _block(in_size: int, out_size: int) -> int:
    """Outputs per product: a block's band of inputs is about three filter widths, so the dense
    matrix is mostly the filter (a wider block multiplies more zeros; a narrower one launches more)."""
    scale = in_size / out_size
    taps = 2 * math.ceil(_SUPPORT * max(scale, 1.0)) + 1
    return int(min(_MAX_BLOCK, max(_MIN_BLOCK, 2 * taps / scale)))


def _pass(x: torch.Tensor, in_size: int, out_size: int, start: int, stop: int, offset: int = 0) -> torch.Tensor:
    """Resample the last dimension of float64 `x` (input pixels [offset, offset + x.shape[-1]) of
    in_size) to outputs [start, stop), rounded to uint8 values as Pillow does (still float64).
    One gather and one batched product: blocks of outputs, each over its own band of inputs."""
    index, weights = _banded(in_size, out_size, start, stop, offset, x.shape[-1], x.device)
    bands = x[..., index]  # [..., blocks, band]
    acc = torch.einsum("...kw,kwb->...kb", bands, weights).flatten(-2)[..., : stop - start]
    return torch.floor((acc + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp_(0, 255)


@functools.lru_cache(maxsize=256)
def _banded(in_size: int, out_size: int, start: int, stop: int, offset: int, width: int, device: torch.device):
    """(input index [blocks, band], fixed-point weights [blocks, band, block]) on `device`: block k
    reads `band` inputs from index[k, 0]; weights past a block's own band are zero."""
    block = _block(in_size, out_size)
    parts = [coefficients(in_size, out_size, b, min(stop, b + block)) for b in range(start, stop, block)]
    band = max(dense.shape[1] for _, dense in parts)
    index = np.zeros((len(parts), band), dtype=np.int64)
    weights = np.zeros((len(parts), band, block), dtype=np.float64)
    for k, (lo, dense) in enumerate(parts):
        first = min(lo - offset, width - band) if width >= band else 0  # keep the band inside x
        index[k] = np.minimum(np.arange(first, first + band), width - 1)
        shift = lo - offset - first
        weights[k, shift : shift + dense.shape[1], : dense.shape[0]] = dense.T
    return torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device)


def vertical_first(in_w: int, in_h: int, width: int, height: int) -> bool:
    """Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    pixels as the width does (the rounding between passes makes the order visible)."""
    return _PILLOW_ORDERS_PASSES and height < in_h and (in_h - height) > 2 * (in_w - width)


def resize_crop(x: torch.Tensor, size: tuple[int, int], box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """`Image.fromarray(x).resize(size, BICUBIC).crop(box)` for a [C, H, W] uint8 tensor, computed
    only over `box` (left, top, right, bottom in the resized image; default: all of it)."""
    width, height = size
    left, top, right, bottom = box or (0, 0, width, height)
    if not (0 <= left < right <= width and 0 <= top < bottom <= height):
        raise ValueError(f"crop box {box} outside the resized {width}x{height} image")
    in_h, in_w = int(x.shape[-2]), int(x.shape[-1])
    if in_w == width and in_h == height:  # Pillow returns a copy for a same-size resize
        return x[..., top:bottom, left:right].contiguous()
    if in_w == width:
        y = x[..., :, left:right].to(torch.float64)
        return _pass(y.transpose(-1, -2), in_h, height, top, bottom).transpose(-1, -2).to(torch.uint8).contiguous()
    if in_h == height:
        return _pass(x[..., top:bottom, :].to(torch.float64), in_w, width, left, right).to(torch.uint8).contiguous()
    if vertical_first(in_w, in_h, width, height):
        col_lo, cols = coefficients(in_w, width, left, right)  # the columns the horizontal pass reads
        y = x[..., :, col_lo : col_lo + cols.shape[1]].to(torch.float64)
        y = _pass(y.transpose(-1, -2), in_h, height, top, bottom).transpose(-1, -2)
        return _pass(y, in_w, width, left, right, col_lo).to(torch.uint8).contiguous()
    row_lo, rows = coefficients(in_h, height, top, bottom)  # the rows the vertical pass reads
    y = _pass(x[..., row_lo : row_lo + rows.shape[1], :].to(torch.float64), in_w, width, left, right)
    return _pass(y.transpose(-1, -2), in_h, height, top, bottom, row_lo).transpose(-1, -2).to(torch.uint8).contiguous()
