"""The attention paths a device takes (decode rows through the paged decode kernel; prompts and chunks
after earlier KV through one flash varlen call, or without it SDPA per prompt length and with a lower-right
causal bias per chunk) against the float32 reference on the host, for mixed steps, steps of fresh prompts
only and steps of prompts beside a chunk. Prints the worst difference per case.

    python bench/attention_check.py
"""

from __future__ import annotations

import random

import torch

from epd.kernels.attention import AttentionMetadata, paged_attention, paged_attention_ref, write_kv


def case(seed: int, device: str, dtype: torch.dtype, kind: str = "mixed") -> float:
    rnd = random.Random(seed)
    bs, heads, kv_heads, dim = 16, 32, 8, 128
    choices = {"mixed": [1, 1, 1, 1, 37, 200], "fresh": [5, 37, 200, 601], "chunked": [37, 200, 601]}[kind]
    qlens = [rnd.choice(choices) for _ in range(12)] + [rnd.choice([64, 300])]
    ctx = [q + rnd.choice([0, 16, 500]) if q > 1 else rnd.randint(1, 900) for q in qlens]
    if kind == "fresh":
        ctx = list(qlens)
    free = list(range(1024))
    rnd.shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // bs))] for c in ctx]
    torch.manual_seed(seed)
    n = sum(qlens)
    q, k, v = torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)
    kc, vc = torch.randn(1024, bs, kv_heads, dim), torch.randn(1024, bs, kv_heads, dim)
    meta = AttentionMetadata.build(tables, qlens, ctx, bs, torch.device("cpu"))
    write_kv(k, v, kc, vc, meta.slot_mapping)
    want = paged_attention_ref(q, kc, vc, meta, dim**-0.5)
    dmeta = AttentionMetadata.build(tables, qlens, ctx, bs, torch.device(device))
    dq, dk, dv = (t.to(device, dtype) for t in (q, k, v))
    got = paged_attention(dq, dk, dv, kc.to(device, dtype), vc.to(device, dtype), dmeta, dim**-0.5)
    return float((got.float().cpu() - want).abs().max())


if __name__ == "__main__":
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for kind in ("mixed", "fresh", "chunked"):
        worst = [case(s, dev, dtype, kind) for s in range(6)]
        print(f"attention_check {dev} {dtype} {kind} steps: max abs diff per case {[f'{w:.4f}' for w in worst]}")
        assert max(worst) < (0.05 if dtype == torch.bfloat16 else 1e-4), (kind, worst)
