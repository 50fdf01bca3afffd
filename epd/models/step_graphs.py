"""Piecewise CUDA graphs for prefill and mixed steps: everything but attention replayed from graphs.

A step that carries prefill tokens cannot be one graph (its attention depends on how the tokens split
into sequences and chunks), and run eagerly a 7B model's step costs the host ~1.8 ms per layer in
launches, more than the GPU needs for a few hundred tokens. So each step is cut at attention: piece 0
computes the rotary tables and layer 0's queries, keys and values (keys and values written to the
cache); piece i finishes layer i-1 (output projection, MLP) and projects layer i; the last piece
finishes the last layer. The pieces are captured once per token-count bucket and replayed with the
step padded up to its bucket; attention runs eagerly in between on the real rows. Every row-wise
operation leaves padded rows' garbage out of real rows, and padded rows write their K/V into a scratch
block no sequence owns.

The pieces read and write static buffers (residual stream, q/k/v, attention output), so their
temporaries are dead when a piece ends and all buckets share one graph memory pool.
Without capture (CPU, tests) the same pieces run eagerly: the decomposition is checked there.
"""

from __future__ import annotations

import torch

from epd.kernels.attention import AttentionMetadata
from epd.models.lm import DecoderLM


def bucket_sizes(max_tokens: int) -> tuple[int, ...]:
    """Token counts to capture: powers of two to 512, then every 256 up to `max_tokens` (padding <= ~25%)."""
    sizes = [s for s in (8, 16, 32, 64, 128, 192, 256, 384, 512) if s < max_tokens]
    sizes += range(768, max_tokens, 256)
    return tuple(sorted(set(sizes + [max(8, max_tokens)])))


class StepGraphs:
    def __init__(self, lm: DecoderLM, kv: torch.Tensor, block_size: int, scratch_block: int, sizes: tuple[int, ...], capture: bool = True):
        if lm.tp != 1:
            raise ValueError("step graphs leave tensor-parallel all-reduces out: run them with tp=1 only")
        self.lm, self.kv, self.block_size, self.scratch = lm, kv, block_size, scratch_block
        attn = lm.model.layers[0].self_attn
        cfg, dev, dtype = lm.cfg, kv.device, kv.dtype
        n = max(sizes)
        self.x = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=dev)  # residual stream
        self.q = torch.zeros(n, attn.num_heads, attn.head_dim, dtype=dtype, device=dev)
        self.k = torch.zeros(n, attn.num_kv_heads, attn.head_dim, dtype=dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.attn = torch.zeros(n, attn.num_heads * attn.head_dim, dtype=dtype, device=dev)
        self.pos = torch.zeros((3, n) if lm.rotary.mrope_section else (n,), dtype=torch.long, device=dev)  # M-RoPE: 3 axes
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=dev)
        self.cos = torch.zeros(n, attn.head_dim, dtype=dtype, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.sizes = tuple(sorted(sizes))
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if capture:
            self.pool = torch.cuda.graph_pool_handle()
            for size in sorted(sizes, reverse=True):
                self._capture(size)

    @property
    def num_pieces(self) -> int:
        return len(self.lm.model.layers) + 1

    def _piece(self, i: int, n: int) -> None:
        """Piece i over the first n rows of the buffers (see the module's docstring)."""
        layers = self.lm.model.layers
        if i == 0:
            cos, sin = self.lm.rotary(self.pos[..., :n], self.x.dtype)
            self.cos[:n].copy_(cos)
            self.sin[:n].copy_(sin)
        else:
            last = layers[i - 1]
            self.x[:n].copy_(last.finish(self.x[:n], last.self_attn.output(self.attn[:n])))
        if i < len(layers):
            layer = layers[i]
            out = (self.q[:n], self.k[:n], self.v[:n])
            layer.self_attn.project(layer.input_layernorm(self.x[:n]), self.cos[:n], self.sin[:n], self.kv[i], self.slots[:n], out)

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        self.slots[:size].fill_(self.scratch * self.block_size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(self.num_pieces):  # warm up: compiled pieces and cuBLAS pick their kernels
                self._piece(i, size)
        torch.cuda.current_stream().wait_stream(stream)
        graphs = []
        for i in range(self.num_pieces):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._piece(i, size)
            graphs.append(graph)
        self.graphs[size] = graphs

    def fits(self, tokens: int) -> bool:
        return tokens <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The residual stream after the last layer [tokens, hidden] for embedded tokens `x`."""
        n = x.shape[0]
        size = min(s for s in self.sizes if s >= n)
        self.x[:n].copy_(x)
        self.pos[..., :n].copy_(positions)  # [n] positions fill every M-RoPE axis alike
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:size].fill_(self.scratch * self.block_size)
        graphs = self.graphs.get(size)
        layers = self.lm.model.layers
        for i in range(self.num_pieces):
            if graphs is not None:
                graphs[i].replay()
            else:
                self._piece(i, size)
            if i < len(layers):
                o = layers[i].self_attn.attend(self.q[:n], self.k[:n], self.v[:n], self.kv[i], meta)
                self.attn[:n].copy_(o.reshape(n, -1))
        return self.x[:n]
