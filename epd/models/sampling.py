"""Token sampling on the logits' device: greedy, temperature, top-k, top-p, batched.

Randomness comes from a counter-based hash of (request seed, token index, vocabulary id), not from
a generator's state: a request's samples do not depend on batching, on which worker samples it or
on what ran before, so every deployment produces the same tokens. One host sync per step: the
sampled ids.
"""

from __future__ import annotations

import torch

from epd.request import SamplingParams

_M1, _M2 = 0x7FB5D329728EA185, 0x5851F42D4C957F2D  # odd 63-bit multipliers
_MASK62 = (1 << 62) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix-style integer hash on int64 (wrapping multiply, logical shifts via masks)."""
    x = (x ^ ((x >> 31) & ((1 << 33) - 1))) * _M1
    x = (x ^ ((x >> 29) & ((1 << 35) - 1))) * _M2
    return x ^ ((x >> 32) & ((1 << 32) - 1))


def uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, vocab] uniforms in (0, 1), a pure function of (seed, step, column)."""
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    key = _mix(_mix(seeds[:, None] * 1_000_003 + steps[:, None]) ^ (cols[None, :] * 0x9E3779B97F4A7C15 & _MASK62))
    bits = (key >> 8) & ((1 << 24) - 1)
    return (bits.double() + 0.5) / float(1 << 24)


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """logits [num_seqs, vocab]; steps[i] = how many tokens sequence i has generated so far."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if rows:
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        sub = logits[idx].double() / torch.tensor([params[i].temperature for i in rows], device=dev, dtype=torch.float64)[:, None]
        top_k = torch.tensor([params[i].top_k or logits.shape[-1] for i in rows], device=dev)
        top_p = torch.tensor([params[i].top_p for i in rows], device=dev, dtype=torch.float64)
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        rank = torch.arange(sub.shape[-1], device=dev)[None, :]
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the top-k, and the smallest prefix whose mass reaches top_p
        keep = (rank < top_k[:, None]) & ((probs.cumsum(-1) - probs) < top_p[:, None])
        masked = torch.full_like(sub, float("-inf")).scatter(1, order, sorted_logits.masked_fill(~keep, float("-inf")))
        seeds = torch.tensor([params[i].seed for i in rows], device=dev, dtype=torch.int64)
        u = uniform(seeds, torch.tensor([steps[i] for i in rows], device=dev, dtype=torch.int64), sub.shape[-1])
        gumbel = -torch.log(-torch.log(u))
        out[idx] = (masked + gumbel).argmax(dim=-1)  # Gumbel-max: an exact draw from softmax(masked)
    return out.tolist()
