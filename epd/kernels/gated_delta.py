"""The gated delta rule of linear-attention layers (Gated DeltaNet), in torch.

Per value head the layer keeps a state S [key_dim, value_dim]. Each token decays it by exp(g), corrects
what it would predict for the token's key towards the token's value by a share beta, and reads it with
the query:

    S <- exp(g) S;   S <- S + beta k (v - k^T S)^T;   o = q^T S

`recurrent_step` applies one token to a batch of sequences (decode); `chunked` applies whole prompts or
chunks (several sequences side by side), a block of `chunk` tokens at a time: within a block the corrections form a
unit-lower-triangular system, solved for every block at once by its inverse; between blocks only S is carried.
Inputs are float32: q and k already L2-normalised and q scaled by key_dim^-0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H]; state [B, H, Dk, Dv] -> (o [B, H, Dv], new state)."""
    state = state * g.exp()[..., None, None]
    predicted = (state * k[..., None]).sum(-2)
    correction = (v - predicted) * beta[..., None]
    state = state + k[..., None] * correction[..., None, :]
    return (state * q[..., None]).sum(-2), state


def chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [..., H, L, Dk]; v [..., H, L, Dv]; g, beta [..., H, L]; state [..., H, Dk, Dv] -> (o [..., H, L, Dv],
    new state). Leading dims are sequences side by side; a shorter one padded at its tail with tokens whose g
    and beta are 0 (no decay, no correction) ends with the state its own last token left."""
    *lead, length, dv = v.shape
    pad = (-length) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    blocks = (length + pad) // chunk
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (t.reshape(*lead, blocks, chunk, t.shape[-1]) for t in (q, k, k_beta, v_beta))
    decay = g.reshape(*lead, blocks, chunk).cumsum(-1)  # log of the decay from the block's start to each token
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    between = (decay[..., :, None] - decay[..., None, :]).masked_fill(later, float("-inf")).exp()  # token j -> token i, i >= j
    inverse = unit_lower_inverse(((k_beta @ k.transpose(-1, -2)) * between).tril(-1))
    corrections = inverse @ v_beta
    key_reads = inverse @ (k_beta * decay.exp()[..., None])
    within = (q @ k.transpose(-1, -2)) * between
    q_read = q * decay.exp()[..., None]
    k_write = k * (decay[..., -1:] - decay).exp()[..., None]
    block_decay = decay[..., -1].exp()[..., None, None]
    out = torch.empty_like(v_beta)
    for b in range(blocks):
        fresh = corrections[..., b, :, :] - key_reads[..., b, :, :] @ state
        out[..., b, :, :] = q_read[..., b, :, :] @ state + within[..., b, :, :] @ fresh
        state = state * block_decay[..., b, :, :] + k_write[..., b, :, :].transpose(-1, -2) @ fresh
    return out.reshape(*lead, -1, dv)[..., :length, :], state


def unit_lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """(I + L)^-1 for strictly lower-triangular L [..., n, n]: L is nilpotent, so the inverse is the sum of
    (-L)^k, k < n, which is the product of (I + (-L)^(2^j)) -- log2(n) batched matmuls (a triangular solve per
    block is a launch-bound loop on GPUs)."""
    n = lower.shape[-1]
    eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
    power = -lower
    inverse = eye + power
    span = 2
    while span < n:
        power = power @ power
        inverse = inverse @ (eye + power)
        span *= 2
    return inverse


def l2_normalized(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
