"""Qwen3.5's hybrid language model (MiniCPM-V 4.6's LM): Gated DeltaNet linear-attention layers, with every
`full_attention_interval`-th layer a gated full attention over the paged KV cache.

A linear layer keeps no KV: per sequence it carries a fixed-size state (its short convolution's last
inputs and the delta rule's recurrent matrix per value head) in a slot of the worker's state pool, [slots,
1, numel] float32, one row a sequence holding every linear layer's state. The step says which slot each
sequence uses and whether it starts from zeros (its first chunk) or continues (a later chunk, a decode
step). Full-attention layers are Qwen3.5's: a sigmoid output gate from the query projection, RMSNorm on
each query and key head, rotary on the first `partial_rotary_factor` of each head's dims. The norms keep
their weights as offsets from 1. Parameter names follow transformers' Qwen3_5TextModel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from epd.config import TextModelConfig
from epd.kernels import gated_delta
from epd.kernels.attention import AttentionMetadata, paged_attention, write_kv
from epd.kernels.fused import rms_norm, rotary
from epd.models.family import linear_state_numel
from epd.models.lm import MLP, RotaryEmbedding, _keep_cols, _keep_rows, _reduce, embed_with_images


@dataclass
class StepStates:
    """Where a step's sequences keep their linear layers' state, and the step's layout as the linear layers
    read it: made once per step (every layer reads it; no host-to-device copy per layer)."""

    pool: torch.Tensor  # [slots, 1, layers * numel] float32
    slots: list[int]  # per sequence of the step
    fresh: list[bool]  # per sequence: starts from a zero state (its first tokens)
    query_lens: list[int]

    def __post_init__(self) -> None:
        dev = self.pool.device
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        singles = [i for i, n in enumerate(self.query_lens) if n == 1]
        # one-token sequences (decode steps): one batched update
        self.single_rows = torch.tensor([starts[i] for i in singles], dtype=torch.long).to(dev, non_blocking=True)
        self.single_slots = torch.tensor([self.slots[i] for i in singles], dtype=torch.long).to(dev, non_blocking=True)
        self.single_fresh = _mask([self.fresh[i] for i in singles], dev)
        self.single_fresh_flags = torch.tensor([int(self.fresh[i]) for i in singles], dtype=torch.int32).to(dev, non_blocking=True)
        self.has_singles = bool(singles)
        # the longer chunks side by side, each padded at its tail to the longest: rows [runs, longest] into the
        # step (a pad repeats the run's first row), which are real, the real rows in that order, and where in
        # [window ++ rows] each run's last inputs sit (its next convolution window)
        runs = [i for i, n in enumerate(self.query_lens) if n != 1]
        self.has_runs = bool(runs)
        if runs:
            longest = max(self.query_lens[i] for i in runs)
            index = [[starts[i] + (j if j < self.query_lens[i] else 0) for j in range(longest)] for i in runs]
            real = [[j < self.query_lens[i] for j in range(longest)] for i in runs]
            self.run_index = torch.tensor(index, dtype=torch.long).to(dev, non_blocking=True)
            self.run_real = torch.tensor(real, dtype=torch.bool).to(dev, non_blocking=True)
            self.run_rows = torch.tensor([r for row, ok in zip(index, real) for r, o in zip(row, ok) if o], dtype=torch.long).to(dev)
            self.run_slots = torch.tensor([self.slots[i] for i in runs], dtype=torch.long).to(dev, non_blocking=True)
            self.run_fresh = _mask([self.fresh[i] for i in runs], dev)
            self.run_lens = [self.query_lens[i] for i in runs]
            self.run_ends = torch.tensor(self.run_lens, dtype=torch.long).to(dev, non_blocking=True)


def _fused(*linears: nn.Linear) -> nn.Linear:
    """One bias-free linear layer whose output is the given layers' outputs side by side."""
    w = torch.cat([linear.weight for linear in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(w)
    return fused


def _triton_delta(x: torch.Tensor, dk: int, dv: int):
    """The Triton decode update (CUDA, power-of-two head dims; `EPD_TRITON_DELTA=0` turns it off), else None.
    One pass over each state in place instead of torch's several: in the decode graphs MiniCPM-V 4.6's step
    on an H200 takes 12.4 ms at batch 64 with it, 31.6 ms without (`bench/hybrid_step.py`)."""
    if not x.is_cuda or os.environ.get("EPD_TRITON_DELTA", "1") == "0" or dk & (dk - 1) or dv & (dv - 1):
        return None
    try:
        from epd.kernels import triton_gated_delta
    except ImportError:
        return None
    return triton_gated_delta


class DecodeStates:
    """A decode step's layout read from static device buffers (what a CUDA graph replays): `slots[i]` is row
    i's state slot; no sequence starts from zeros."""

    has_singles, has_runs = True, False
    single_fresh = None

    def __init__(self, pool: torch.Tensor, slots: torch.Tensor):
        self.pool, self.single_slots = pool, slots
        self.single_rows = torch.arange(slots.shape[0], device=slots.device)
        self.single_fresh_flags = torch.zeros(slots.shape[0], dtype=torch.int32, device=slots.device)


def _mask(flags: list[bool], dev: torch.device) -> Optional[torch.Tensor]:
    """A [n, 1] mask of the rows to zero; None when there are none."""
    return torch.tensor(flags, dtype=torch.bool).to(dev, non_blocking=True)[:, None] if any(flags) else None


class OffsetRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as its offset from 1 (scale = 1 + weight), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """RMSNorm of the linear layer's output per head, then gated by SiLU(z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (rms_norm(x, self.weight, self.eps) * F.silu(z.float())).to(x.dtype)


class GatedAttention(nn.Module):
    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.attn_head_dim
        self.rotary_dim = int(self.head_dim * cfg.partial_rotary_factor)
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = OffsetRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = OffsetRMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.tp_group = None

    def shard(self, rank: int, tp: int, group) -> None:
        """This rank's query heads (each with its gate), KV heads and o_proj columns; o_proj's sums all-reduced."""
        if self.num_heads % tp or self.num_kv_heads % tp:
            raise ValueError(f"tp={tp} must divide the attention heads ({self.num_heads}) and KV heads ({self.num_kv_heads})")
        self.num_heads, self.num_kv_heads = self.num_heads // tp, self.num_kv_heads // tp
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            _keep_rows(linear, rank, tp)
        _keep_cols(self.o_proj, rank, tp)
        self.tp_group = group

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rotary_dim
        return torch.cat([rotary(x[..., :r], cos, sin), x[..., r:]], dim=-1) if r < self.head_dim else rotary(x, cos, sin)

    def fuse(self) -> None:
        """One matmul for the gated query, k and v (after loading and sharding)."""
        self.qkv_proj = _fused(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self, "qkv_proj"):
            q_width, kv_width = self.num_heads * 2 * self.head_dim, self.num_kv_heads * self.head_dim
            return self.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        qg, k, v = self._project(x)
        q, gate = qg.reshape(n, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self._rotate(self.q_norm(q), cos, sin)
        k = self._rotate(self.k_norm(k.reshape(n, self.num_kv_heads, self.head_dim)), cos, sin)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        write_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return _reduce(self.o_proj(o.reshape(n, -1) * torch.sigmoid(gate.reshape(n, -1))), self.tp_group)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextModelConfig, index: int):
        super().__init__()
        self.index = index  # among the linear layers: its part of a state-pool row
        self.k_heads, self.v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.k_heads * self.dk, self.v_heads * self.dv
        self.kernel = cfg.linear_conv_kernel_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.numel = linear_state_numel(cfg)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, padding=self.kernel - 1, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.v_heads, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.v_heads, bias=False)
        self.tp_group = None

    def shard(self, rank: int, tp: int, group) -> None:
        """This rank's key and value heads: their rows of the q, k and v sections (and convolution channels),
        of z, b and a, their decays and step sizes, and out_proj's columns; its state per sequence shrinks
        alike. Value head j reads key head j // (v_heads / k_heads), so contiguous shares stay paired."""
        if self.k_heads % tp or self.v_heads % tp:
            raise ValueError(f"tp={tp} must divide the linear layers' key heads ({self.k_heads}) and value heads ({self.v_heads})")

        def share(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
            parts = t.split(sizes)
            return torch.cat([part.chunk(tp)[rank] for part in parts]).clone()

        sections = [self.key_dim, self.key_dim, self.value_dim]
        with torch.no_grad():
            self.in_proj_qkv.weight = nn.Parameter(share(self.in_proj_qkv.weight.data, sections), requires_grad=False)
            self.conv1d.weight = nn.Parameter(share(self.conv1d.weight.data, sections), requires_grad=False)
            for name in ("dt_bias", "A_log"):
                setattr(self, name, nn.Parameter(getattr(self, name).data.chunk(tp)[rank].clone(), requires_grad=False))
        for linear in (self.in_proj_z, self.in_proj_b, self.in_proj_a):
            _keep_rows(linear, rank, tp)
        _keep_cols(self.out_proj, rank, tp)
        self.k_heads, self.v_heads = self.k_heads // tp, self.v_heads // tp
        self.key_dim, self.value_dim = self.key_dim // tp, self.value_dim // tp
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv.out_features = self.conv1d.out_channels = self.conv1d.in_channels = self.conv1d.groups = self.conv_dim
        self.numel = self.numel // tp
        self.tp_group = group

    def _states(self, pool: torch.Tensor, slots: torch.Tensor, fresh) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (conv window [n, kernel-1, conv_dim], recurrent [n, H, Dk, Dv]) of `slots`; zeros where
        `fresh` (a [n, 1] mask, or a bool for one sequence)."""
        row = pool.view(pool.shape[0], -1)[slots, self.index * self.numel : (self.index + 1) * self.numel]
        if fresh is True:
            row = torch.zeros_like(row)
        elif fresh is not None and fresh is not False:
            row = row.masked_fill(fresh, 0.0)
        split = (self.kernel - 1) * self.conv_dim
        return row[:, :split].view(-1, self.kernel - 1, self.conv_dim), row[:, split:].view(-1, self.v_heads, self.dk, self.dv)

    def _windows(self, pool: torch.Tensor, slots: torch.Tensor, fresh) -> torch.Tensor:
        """This layer's convolution windows of `slots` alone, [n, kernel-1, conv_dim]; zeros where `fresh`."""
        split = (self.kernel - 1) * self.conv_dim
        row = pool.view(pool.shape[0], -1)[slots, self.index * self.numel : self.index * self.numel + split]
        if fresh is not None:
            row = row.masked_fill(fresh, 0.0)
        return row.view(-1, self.kernel - 1, self.conv_dim)

    def _store(self, pool: torch.Tensor, slots: torch.Tensor, window: torch.Tensor, recurrent: torch.Tensor) -> None:
        rows = torch.cat([window.reshape(window.shape[0], -1), recurrent.reshape(recurrent.shape[0], -1)], dim=1)
        pool.view(pool.shape[0], -1)[slots, self.index * self.numel : (self.index + 1) * self.numel] = rows.float()

    def _convolved(self, window: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """window [n, kernel-1, C] (earlier inputs), x [n, L, C] -> (SiLU(causal depthwise conv) [n, L, C], new window)."""
        full = torch.cat([window.to(x.dtype), x], dim=1)
        return self._conv(full), full[:, full.shape[1] - (self.kernel - 1) :]  # the last kernel-1 inputs (none for kernel 1)

    def _conv(self, full: torch.Tensor) -> torch.Tensor:
        """[n, kernel-1 + L, C] inputs (the window first) -> SiLU of the depthwise convolution at the last L, [n, L, C]."""
        w = self.conv1d.weight
        out = F.conv1d(full.transpose(1, 2).to(w.dtype), w, groups=self.conv_dim).transpose(1, 2)
        return F.silu(out).to(full.dtype)

    def _heads(self, mixed: torch.Tensor, b: torch.Tensor, a: torch.Tensor):
        """[..., C] -> q, k [..., H, Dk] (normalised, q scaled, key heads repeated per value head), v, g, beta (float32)."""
        q, k, v = mixed.float().split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        rep = self.v_heads // self.k_heads
        q = gated_delta.l2_normalized(q.unflatten(-1, (self.k_heads, self.dk))).repeat_interleave(rep, dim=-2) * self.dk**-0.5
        k = gated_delta.l2_normalized(k.unflatten(-1, (self.k_heads, self.dk))).repeat_interleave(rep, dim=-2)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return q, k, v.unflatten(-1, (self.v_heads, self.dv)), g, b.float().sigmoid()

    def fuse(self) -> None:
        """One matmul for the four input projections (after loading and sharding)."""
        self.in_proj = _fused(self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a)
        del self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if hasattr(self, "in_proj"):
            return self.in_proj(x).split([self.conv_dim, self.value_dim, self.v_heads, self.v_heads], dim=-1)
        return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        st: StepStates = meta.states
        n = x.shape[0]
        mixed, z, b, a = self._project(x)
        core = torch.empty(n, self.v_heads, self.dv, dtype=x.dtype, device=x.device)
        if st.has_singles:  # decode steps (and one-token chunks): one batched update
            rows, slots = st.single_rows, st.single_slots
            kernel = _triton_delta(x, self.dk, self.dv)
            if kernel is not None:  # the recurrent state updated in place in the pool, one pass
                window = self._windows(st.pool, slots, st.single_fresh)
                conv, window = self._convolved(window, mixed[rows][:, None])
                q, k, v, g, beta = self._heads(conv[:, 0], b[rows], a[rows])
                split = (self.kernel - 1) * self.conv_dim
                flat = st.pool.view(st.pool.shape[0], -1)
                o = kernel.step_in_pool(q, k, v.float(), g, beta, flat, slots, st.single_fresh_flags, self.index * self.numel + split)
                flat[slots, self.index * self.numel : self.index * self.numel + split] = window.reshape(window.shape[0], -1).float()
            else:
                window, rec = self._states(st.pool, slots, st.single_fresh)
                conv, window = self._convolved(window, mixed[rows][:, None])
                q, k, v, g, beta = self._heads(conv[:, 0], b[rows], a[rows])
                o, rec = gated_delta.recurrent_step(q, k, v.float(), g, beta, rec)
                self._store(st.pool, slots, window, rec)
            core[rows] = o.to(x.dtype)
        if st.has_runs:  # prompts and chunks: side by side, padded with tokens that change nothing
            window, rec = self._states(st.pool, st.run_slots, st.run_fresh)
            real = st.run_real[..., None]
            xs = mixed[st.run_index] * real
            full = torch.cat([window.to(xs.dtype), xs], dim=1)
            conv = self._conv(full)
            ends = st.run_ends[:, None] + torch.arange(self.kernel - 1, device=x.device)
            window = full.gather(1, ends[..., None].expand(-1, -1, self.conv_dim))
            q, k, v, g, beta = self._heads(conv, b[st.run_index], a[st.run_index])
            g, beta = g * real, beta * real
            q, k, v, g, beta = (t.transpose(1, 2) for t in (q, k, v.float(), g, beta))  # heads before tokens
            o, rec = gated_delta.chunked(q, k, v, g, beta, rec)
            core[st.run_rows] = o.transpose(1, 2)[st.run_real].to(x.dtype)
            self._store(st.pool, st.run_slots, window, rec)
        out = self.norm(core, z.reshape(n, self.v_heads, self.dv))
        return _reduce(self.out_proj(out.reshape(n, -1)), self.tp_group)


class HybridLayer(nn.Module):
    def __init__(self, cfg: TextModelConfig, layer: int, linear_index: Optional[int], kv_index: Optional[int]):
        super().__init__()
        self.kv_index = kv_index
        if linear_index is not None:
            self.linear_attn = GatedDeltaNet(cfg, linear_index)
        else:
            self.self_attn = GatedAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv_caches, meta):
        h = self.input_layernorm(x)
        if self.kv_index is None:
            h = self.linear_attn(h, meta)
        else:
            h = self.self_attn(h, cos, sin, kv_caches[self.kv_index], meta)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridBody(nn.Module):
    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        full = cfg.full_attention_layers
        layers, linear = [], 0
        for i in range(cfg.num_layers):
            if i in full:
                layers.append(HybridLayer(cfg, i, None, full.index(i)))
            else:
                layers.append(HybridLayer(cfg, i, linear, None))
                linear += 1
        self.layers = nn.ModuleList(layers)
        self.norm = OffsetRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class HybridLM(nn.Module):
    """The paged LM's interface (embed, forward, logits) for a hybrid model; every step needs `meta.states`."""

    has_state = True

    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = HybridBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(int(cfg.attn_head_dim * cfg.partial_rotary_factor), cfg.rope_theta)
        self.tp = 1
        self.fused = False

    def shard(self, rank: int, tp: int, group) -> None:
        """Tensor parallelism (Megatron style): each rank its share of the attention heads, linear heads and MLP
        width, and of every sequence's state; embeddings and lm_head replicated."""
        for layer in self.model.layers:
            mixer = layer.self_attn if layer.kv_index is not None else layer.linear_attn
            mixer.shard(rank, tp, group)
            layer.mlp.shard(rank, tp, group)
        self.tp = tp

    def fuse(self) -> None:
        """Fuse each layer's input projections and the MLP's gate/up (after loading and sharding). Idempotent."""
        if self.fused:
            return
        self.fused = True
        for layer in self.model.layers:
            (layer.self_attn if layer.kv_index is not None else layer.linear_attn).fuse()
            layer.mlp.fuse()

    @property
    def head_dim(self) -> int:
        return self.cfg.attn_head_dim

    def embed(self, input_ids, mm_embeds, mm_mask):
        return embed_with_images(self.model.embed_tokens, input_ids, mm_embeds, mm_mask)

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, mm_embeds=None, mm_mask=None) -> torch.Tensor:
        if meta.states is None:
            raise ValueError("a hybrid LM step needs its sequences' state slots (meta.states)")
        x = self.embed(input_ids, mm_embeds, mm_mask)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, kv_caches, meta)
        return self.logits(x, meta)

    def logits(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.logits_indices is not None:
            hidden = hidden[meta.logits_indices]
        return self.lm_head(self.model.norm(hidden))
