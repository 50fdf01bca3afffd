"""Token sampling: greedy, temperature, top-k, top-p; seeded per (request seed, token index).

Seeding by token index makes a request's samples independent of batching and of which
worker samples it, so every deployment produces the same tokens.
"""

from __future__ import annotations

import torch

from epd.request import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """logits [num_seqs, vocab]; steps[i] = how many tokens sequence i has generated so far."""
    greedy = logits.argmax(dim=-1)
    out = greedy.tolist()
    for i, (p, step) in enumerate(zip(params, steps)):
        if p.temperature > 0:
            out[i] = _sample_one(logits[i].float(), p, step)
    return out


def _sample_one(logits: torch.Tensor, p: SamplingParams, step: int) -> int:
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    gen = torch.Generator(device="cpu").manual_seed((p.seed * 1_000_003 + step) % (2**63))
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())
