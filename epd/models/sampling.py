"""Token sampling on the logits' device, batched: penalties, logit bias, min_tokens, greedy or
temperature/top-k/top-p draws, and logprobs.

Randomness comes from a counter-based hash of (request seed, token index, vocabulary id), not from
a generator's state: a request's samples do not depend on batching, on which worker samples it or
on what ran before, so every deployment produces the same tokens. One host sync per step: the
sampled ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from epd.request import SamplingParams, TokenLogprob

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


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[Optional[TokenLogprob]]  # per row: None unless its request asked for logprobs


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int], **history) -> list[int]:
    """The sampled token ids alone (see `sample_full`)."""
    return sample_full(logits, params, steps, **history).tokens


def sample_full(
    logits: torch.Tensor,
    params: list[SamplingParams],
    steps: list[int],
    prompts: Optional[Sequence[Optional[Sequence[int]]]] = None,
    outputs: Optional[Sequence[Optional[Sequence[int]]]] = None,
    eos_token_id: Optional[int] = None,
) -> Sampled:
    """The sampled ids on the host, with the logprobs rows asked for (see `sample_ids`)."""
    tokens = sample_ids(logits, params, steps, prompts, outputs, eos_token_id).tolist()
    return Sampled(tokens, _logprobs(logits, params, tokens))


def sample_ids(
    logits: torch.Tensor,
    params: list[SamplingParams],
    steps: list[int],
    prompts: Optional[Sequence[Optional[Sequence[int]]]] = None,
    outputs: Optional[Sequence[Optional[Sequence[int]]]] = None,
    eos_token_id: Optional[int] = None,
) -> torch.Tensor:
    """The sampled ids [num_seqs] on the logits' device, without a host sync.

    logits [num_seqs, vocab]; steps[i] = how many tokens sequence i has generated so far.

    Logits are processed in transformers' order — logit bias, repetition penalty (over prompts[i]
    and outputs[i]), presence and frequency penalties (over outputs[i]), min_tokens (EOS and stop
    tokens masked) — then greedy rows take the argmax and the others are drawn after temperature,
    top-k and top-p (top-p over the top-k renormalised). `prompts`/`outputs` are needed only for rows
    with penalties. Logprobs are of the raw logits.
    """
    vocab = logits.shape[-1]
    dev = logits.device
    x = logits
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if rows:
        x = logits.float().clone()
        idx = torch.tensor(rows, device=dev)
        x[idx] = _process(x[idx], [params[i] for i in rows], [steps[i] for i in rows], rows, prompts, outputs, eos_token_id)
    out = x.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=dev)
        sub = x[idx].double() / torch.tensor([params[i].temperature for i in rows], device=dev, dtype=torch.float64)[:, None]
        top_k = torch.tensor([min(params[i].top_k or vocab, vocab) for i in rows], device=dev)
        top_p = torch.tensor([params[i].top_p for i in rows], device=dev, dtype=torch.float64)
        sorted_logits, order = sub.sort(dim=-1, descending=True)
        in_k = torch.arange(vocab, device=dev)[None, :] < top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(~in_k, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the top-k, and the smallest prefix of them whose (renormalised) mass reaches top_p
        keep = in_k & ((probs.cumsum(-1) - probs) < top_p[:, None])
        masked = torch.full_like(sub, float("-inf")).scatter(1, order, sorted_logits.masked_fill(~keep, float("-inf")))
        seeds = torch.tensor([params[i].seed for i in rows], device=dev, dtype=torch.int64)
        u = uniform(seeds, torch.tensor([steps[i] for i in rows], device=dev, dtype=torch.int64), vocab)
        gumbel = -torch.log(-torch.log(u))
        out[idx] = (masked + gumbel).argmax(dim=-1)  # Gumbel-max: an exact draw from softmax(masked)
    return out


def _process(x, params, steps, rows, prompts, outputs, eos_token_id) -> torch.Tensor:
    """Penalties, bias and masks on x [len(params), vocab] (float32), in place."""
    dev, vocab = x.device, x.shape[-1]
    bias = [(r, t, b) for r, p in enumerate(params) for t, b in p.logit_bias]
    if bias:
        r, t, b = zip(*bias)
        x[torch.tensor(r, device=dev), torch.tensor(t, device=dev)] += torch.tensor(b, device=dev, dtype=x.dtype)
    rep = [r for r, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep:
        seen = _counts([list(_at(prompts, rows[r])) + list(_at(outputs, rows[r])) for r in rep], vocab, dev) > 0
        pen = torch.tensor([params[r].repetition_penalty for r in rep], device=dev, dtype=x.dtype)[:, None]
        sub = x[rep]
        x[rep] = torch.where(seen, torch.where(sub < 0, sub * pen, sub / pen), sub)
    opn = [r for r, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
    if opn:
        counts = _counts([_at(outputs, rows[r]) for r in opn], vocab, dev).to(x.dtype)
        freq = torch.tensor([params[r].frequency_penalty for r in opn], device=dev, dtype=x.dtype)[:, None]
        pres = torch.tensor([params[r].presence_penalty for r in opn], device=dev, dtype=x.dtype)[:, None]
        x[opn] -= freq * counts + pres * (counts > 0).to(x.dtype)
    for r, p in enumerate(params):
        stops = [*p.stop_token_ids, *([] if eos_token_id is None else [eos_token_id])]
        if p.ignore_eos or not stops:
            continue
        if p.answer_tokens is not None and steps[r] + 1 >= p.answer_tokens and eos_token_id is not None:
            x[r] = float("-inf")  # the answer's last token: EOS
            x[r, eos_token_id] = 0.0
        elif steps[r] < p.min_tokens or (p.answer_tokens is not None and steps[r] + 1 < p.answer_tokens):
            x[r, torch.tensor(stops, device=dev)] = float("-inf")
    return x


def _at(seqs, i) -> Sequence[int]:
    if seqs is None or seqs[i] is None:
        raise ValueError("penalties need the sequence's prompt and output tokens")
    return seqs[i]


def _counts(seqs: list[Sequence[int]], vocab: int, dev) -> torch.Tensor:
    """[len(seqs), vocab] occurrences of each token id."""
    counts = torch.zeros(len(seqs), vocab, dtype=torch.int64, device=dev)
    for r, seq in enumerate(seqs):
        if len(seq):
            ids = torch.as_tensor(list(seq), dtype=torch.int64, device=dev)
            counts[r].scatter_add_(0, ids, torch.ones_like(ids))
    return counts


def _logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[Optional[TokenLogprob]]:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list[Optional[TokenLogprob]] = [None] * len(params)
    if not rows:
        return result
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)
    k = max(params[i].logprobs for i in rows)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))[:, 0].tolist()
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        n = params[i].logprobs
        result[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(top_i[j][:n], top_v[j][:n])))
    return result
