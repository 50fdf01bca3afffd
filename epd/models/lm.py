"""Decoder-only language model (Llama / Qwen2 architecture) over a paged KV cache.

Parameter names follow Hugging Face (`model.layers.N.self_attn.q_proj`, `lm_head`), so a
checkpoint's language-model tensors load by name. The forward takes a flat batch of tokens
from many sequences (prefill and decode alike) and attention metadata.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from epd.config import TextModelConfig
from epd.kernels.attention import AttentionMetadata, paged_attention
from epd.kernels.fused import place_qkv, rms_norm, rope_qkv, rotary, silu_mul


def _keep_rows(linear: nn.Linear, rank: int, tp: int) -> None:
    """Column parallel: this rank's slice of the output features."""
    n = linear.out_features // tp
    linear.weight = nn.Parameter(linear.weight.data[rank * n : (rank + 1) * n].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rank * n : (rank + 1) * n].clone(), requires_grad=False)
    linear.out_features = n


def _keep_cols(linear: nn.Linear, rank: int, tp: int) -> None:
    """Row parallel: this rank's slice of the input features (no bias in o_proj/down_proj)."""
    n = linear.in_features // tp
    linear.weight = nn.Parameter(linear.weight.data[:, rank * n : (rank + 1) * n].contiguous(), requires_grad=False)
    linear.in_features = n


def _reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def embed_with_images(
    embed_tokens: nn.Embedding, input_ids: torch.Tensor, mm_embeds: Optional[torch.Tensor], mm_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Token embeddings with image placeholder positions replaced by the encoder's embeddings, in order."""
    x = embed_tokens(input_ids)
    if mm_embeds is not None and mm_mask is not None and mm_embeds.shape[0]:
        if int(mm_mask.sum()) != mm_embeds.shape[0]:
            raise ValueError(f"{int(mm_mask.sum())} image placeholders but {mm_embeds.shape[0]} image embeddings")
        x = x.masked_scatter(mm_mask[:, None], mm_embeds.to(x.dtype))
    return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotary tables for positions [tokens], or [3, tokens] with `mrope_section` (M-RoPE: the head's
    frequency pairs split into time, height and width sections, each rotated by its own axis)."""

    def __init__(self, head_dim: int, theta: float, mrope_section: Optional[tuple[int, ...]] = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mrope_section = tuple(mrope_section) if mrope_section else None
        if self.mrope_section is not None:
            if sum(self.mrope_section) != head_dim // 2 or len(self.mrope_section) != 3:
                raise ValueError(f"mrope_section {list(self.mrope_section)} must be 3 sections summing to head_dim/2 = {head_dim // 2}")
            axis = torch.repeat_interleave(torch.arange(3), torch.tensor(self.mrope_section))
            self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 2:  # [3, tokens]: each frequency takes its section's axis
            freqs = positions.float()[self.axis].T * self.inv_freq[None, :]
        else:
            freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    return rotary(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.scale = self.head_dim**-0.5
        bias = cfg.arch == "qwen2"  # Qwen2 has q/k/v biases, Llama none
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: Optional[nn.Linear] = None
        self.tp_group = None

    def shard(self, rank: int, tp: int, group) -> None:
        """Keep this rank's heads (q/k/v rows, o_proj columns); o_proj's partial sums are all-reduced."""
        if self.num_heads % tp or self.num_kv_heads % tp:
            raise ValueError(f"tp={tp} must divide the attention heads ({self.num_heads}) and KV heads ({self.num_kv_heads})")
        self.num_heads, self.num_kv_heads = self.num_heads // tp, self.num_kv_heads // tp
        _keep_rows(self.q_proj, rank, tp)
        _keep_rows(self.k_proj, rank, tp)
        _keep_rows(self.v_proj, rank, tp)
        _keep_cols(self.o_proj, rank, tp)
        self.tp_group = group

    def fuse(self) -> None:
        """One matmul for q, k and v (fewer launches on GPU); loading is done by then."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        has_bias = self.q_proj.bias is not None
        self.qkv_proj = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.qkv_proj.weight.copy_(w)
            if has_bias:
                self.qkv_proj.bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
        del self.q_proj, self.k_proj, self.v_proj

    def project(self, x, cos, sin, kv_cache: torch.Tensor, slots: torch.Tensor, out=None) -> tuple[torch.Tensor, ...]:
        """The new tokens' queries, keys and values (rotated); keys and values written to their cache slots.
        `out`: tensors (q, k, v) to write them into."""
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
            return rope_qkv(qkv, cos, sin, kv_cache[0], kv_cache[1], slots, self.num_heads, self.num_kv_heads, self.head_dim, out)
        n = x.shape[0]
        q = apply_rotary(self.q_proj(x).reshape(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(n, self.num_kv_heads, self.head_dim)
        return place_qkv(q, k, v, kv_cache[0], kv_cache[1], slots, out)

    def attend(self, q, k, v, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return _reduce(self.o_proj(o.reshape(o.shape[0], -1)), self.tp_group)

    def forward(self, x, cos, sin, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin, kv_cache, meta.slot_mapping)
        return self.output(self.attend(q, k, v, kv_cache, meta))


class MLP(nn.Module):
    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: Optional[nn.Linear] = None
        self.tp_group = None

    def shard(self, rank: int, tp: int, group) -> None:
        if self.down_proj.in_features % tp:
            raise ValueError(f"tp={tp} must divide the MLP width ({self.down_proj.in_features})")
        _keep_rows(self.gate_proj, rank, tp)
        _keep_rows(self.up_proj, rank, tp)
        _keep_cols(self.down_proj, rank, tp)
        self.tp_group = group

    def fuse(self) -> None:
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_up_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(w)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return _reduce(self.down_proj(silu_mul(self.gate_up_proj(x))), self.tp_group)
        return _reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), self.tp_group)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache, meta):
        return self.finish(x, self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta))

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The layer after attention: its output added to the residual stream, then the MLP's."""
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    def __init__(self, cfg: TextModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    def __init__(self, cfg: TextModelConfig, mrope_section: Optional[tuple[int, ...]] = None):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.rope_theta, mrope_section)
        self.tp = 1
        self.fused = False

    def shard(self, rank: int, tp: int, group) -> None:
        """Tensor parallelism (Megatron style): heads and MLP width split over `tp` ranks; embeddings and
        lm_head replicated, so every rank computes the same logits and samples the same tokens."""
        for layer in self.model.layers:
            layer.self_attn.shard(rank, tp, group)
            layer.mlp.shard(rank, tp, group)
        self.tp = tp

    def fuse(self) -> None:
        """Fuse q/k/v and gate/up projections (after loading: HF names are per projection). Idempotent."""
        if self.fused:
            return
        self.fused = True
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    @property
    def head_dim(self) -> int:
        return self.cfg.hidden_size // self.cfg.num_heads

    def embed(self, input_ids: torch.Tensor, mm_embeds: Optional[torch.Tensor], mm_mask: Optional[torch.Tensor]):
        return embed_with_images(self.model.embed_tokens, input_ids, mm_embeds, mm_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,  # rotary positions: [tokens], or [3, tokens] for M-RoPE
        kv_caches: torch.Tensor,  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        mm_embeds: Optional[torch.Tensor] = None,
        mm_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Returns logits [num_seqs, vocab] for each sequence's last new token."""
        x = self.embed(input_ids, mm_embeds, mm_mask)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv_caches[i], meta)
        return self.logits(x, meta)

    def logits(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Each sequence's last-token logits from the residual stream after the last layer."""
        if meta.logits_indices is not None:
            hidden = hidden[meta.logits_indices]
        return self.lm_head(self.model.norm(hidden))
