"""Triton paged decode attention: one query token per sequence, GQA, KV read through block tables.

Grid: (sequence, kv head, split). Each program holds the GROUP query heads that share one KV head,
walks its share of the sequence's tokens BLOCK_N at a time (gathering rows through the block
table) with an online softmax, and writes a partial result; a second kernel merges the splits.
Splitting the context keeps the GPU busy when batches are small and contexts long.
Context lengths come from a device tensor, so the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Integer arguments Triton would specialise on (a value of 1, or divisible by 16) that change from step to step:
# the block table's width in an eager step (a mixed step's decodes) and the split buffers' strides (the split
# count follows the batch). Each new combination compiled a new kernel inside a served step: 0.7-0.85 s on an
# H200 (`bench/mixed_first.py`). None of them addresses a vector load.
_VARYING = ["s_tb", "s_mb", "s_mh"]


@triton.jit(do_not_specialize=_VARYING)
def _decode_partial(
    Q,
    K,
    V,
    Out,
    M,
    L,
    tables,
    ctx_lens,
    scale,
    s_qb,
    s_qh,
    s_kb,
    s_kt,
    s_kh,
    s_tb,
    s_ob,
    s_oh,
    s_os,
    s_mb,
    s_mh,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_lens + b)
    per_split = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, ctx)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    gmask = offs_g < GROUP
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    n_iter = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    for it in range(0, n_iter):
        tok = lo + it * BLOCK_N + offs_n
        valid = tok < hi
        blk = tl.load(tables + b * s_tb + tok // BLOCK_SIZE, mask=valid, other=0)
        row = blk.to(tl.int64) * s_kb + (tok % BLOCK_SIZE) * s_kt + kvh * s_kh
        k = tl.load(K + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o_ptr = Out + b * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :]
    tl.store(o_ptr, acc, mask=gmask[:, None])
    tl.store(M + b * s_mb + heads * s_mh + split, m_i, mask=gmask)
    tl.store(L + b * s_mb + heads * s_mh + split, l_i, mask=gmask)


@triton.jit(do_not_specialize=["s_mb", "s_mh"])
def _merge_splits(Part, M, L, Out, s_pb, s_ph, s_ps, s_mb, s_mh, s_ob, s_oh, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.load(M + b * s_mb + h * s_mh + offs_s)
    lsum = tl.load(L + b * s_mb + h * s_mh + offs_s)
    m_max = tl.max(m, 0)
    w = tl.where(lsum > 0, tl.exp(m - m_max), 0.0)
    part = tl.load(Part + b * s_pb + h * s_ph + offs_s[:, None] * s_ps + offs_d[None, :])
    o = tl.sum(part * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(Out + b * s_ob + h * s_oh + offs_d, o.to(Out.dtype.element_ty))


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    splits: int = 0,
    block_n: int = 64,
    num_warps: int = 2,
    num_stages: int = 4,
) -> torch.Tensor:
    """q [B, H, D]; caches [blocks, block_size, KVH, D]; block_tables [B, max_blocks] int32; context_lens [B] int32.
    `block_n` tokens a loop iteration; `num_warps`, `num_stages`: Triton's launch options. The defaults were the
    fastest on average over batches 1-256 and MHA/GQA heads on an H200 (`bench/decode_attention.py`: 2-4% over
    64/4/3 at 256 sequences, 11% at 8)."""
    b, h, d = q.shape
    kvh = k_cache.shape[2]
    group = h // kvh
    if splits <= 0:  # enough programs to fill the GPU: aim for ~4 waves of 132 SMs
        splits = max(1, min(16, triton.next_power_of_2(max(1, 528 // max(1, b * kvh)))))
    part = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
    m = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    out = torch.empty_like(q)
    _decode_partial[(b, kvh, splits)](
        q,
        k_cache,
        v_cache,
        part,
        m,
        lsum,
        block_tables,
        context_lens,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        m.stride(0),
        m.stride(1),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=d,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # float32 caches: no TF32 rounding in the dots
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _merge_splits[(b, h)](
        part,
        m,
        lsum,
        out,
        part.stride(0),
        part.stride(1),
        part.stride(2),
        m.stride(0),
        m.stride(1),
        out.stride(0),
        out.stride(1),
        HEAD_DIM=d,
        SPLITS=splits,
    )
    return out
