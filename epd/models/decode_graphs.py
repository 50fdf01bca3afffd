"""CUDA graphs for the decode step: one graph per batch size, replayed with static input buffers.

A decode step of a 7B model is hundreds of small kernel launches; replaying a captured graph
removes the launch gaps. Batches are padded up to the next captured size; padded rows write their
K/V into a scratch block that no sequence owns.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from epd.kernels.attention import AttentionMetadata
from epd.models.device_tokens import Fed
from epd.models.lm import DecoderLM

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(
        self,
        lm: DecoderLM,
        kv: torch.Tensor,
        block_size: int,
        scratch_block: int,
        max_blocks: int,
        sizes: tuple[int, ...] = DEFAULT_SIZES,
        state: Optional[torch.Tensor] = None,
    ):
        """`state`: a hybrid LM's state pool, whose last slot is the padded rows' scratch."""
        self.lm, self.kv, self.block_size, self.scratch = lm, kv, block_size, scratch_block
        dev = kv.device
        n = max(sizes)
        self.state = state
        if state is not None:
            self.state_slots = torch.full((n,), state.shape[0] - 1, dtype=torch.long, device=dev)
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=dev)
        self.ctx = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.max_blocks = max_blocks
        self._last_key: object = None
        self._metas: dict[int, AttentionMetadata] = {}
        for bs in sorted(sizes, reverse=True):
            self._capture(bs)

    def _meta(self, bs: int) -> AttentionMetadata:
        states = None
        if self.state is not None:
            from epd.models.hybrid_lm import DecodeStates

            states = DecodeStates(self.state, self.state_slots[:bs])
        return AttentionMetadata(
            slot_mapping=self.slots[:bs],
            query_lens=[1] * bs,
            context_lens=[1] * bs,
            block_tables=self.tables[:bs],
            block_size=self.block_size,
            context_lens_t=self.ctx[:bs],
            logits_indices=None,
            is_decode=True,
            states=states,
        )

    @torch.inference_mode()
    def _capture(self, bs: int) -> None:
        meta = self._meta(bs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks kernels
                self.lm(self.ids[:bs], self.pos[:bs], self.kv, meta)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.lm(self.ids[:bs], self.pos[:bs], self.kv, meta)
        self.graphs[bs] = (graph, out)
        self._metas[bs] = meta  # the graph reads the tensors made for it (a hybrid LM's row indices): kept alive

    def fits(self, batch: int, tables: list[list[int]]) -> bool:
        return batch <= max(self.graphs) and all(len(t) <= self.max_blocks for t in tables)

    @torch.inference_mode()
    def run(
        self,
        tokens: list[int],
        positions: list[int],
        tables: list[list[int]],
        key: object = None,
        rope_shift: Optional[list[int]] = None,
        fed: Optional[Fed] = None,
        state_slots: Optional[list[int]] = None,
    ) -> torch.Tensor:
        """Logits [len(tokens), vocab] for one decode step; positions are the new tokens' positions in the
        cache, `rope_shift` what M-RoPE adds to them for the rotary position (generated tokens of a
        Qwen2-VL sequence: the same on every axis, so the one-axis rotary computes it); `fed` rows take
        their token from an earlier step's sampled ids on the device.

        `key` names the batch's sequences and their tables' version; when it repeats, the block tables
        already in place are reused. The inputs go up in one copy from pinned memory: it never waits for
        the steps still running, so the next step is queued while the GPU works.
        """
        b = len(tokens)
        bs = min(s for s in self.graphs if s >= b)
        bsz = self.block_size
        slots = [t[p // bsz] * bsz + p % bsz for t, p in zip(tables, positions)]
        pad = bs - b
        rotary = positions if rope_shift is None else [p + d for p, d in zip(positions, rope_shift)]
        host = tokens + [0] * pad + rotary + [0] * pad + slots + [self.scratch * bsz] * pad + [p + 1 for p in positions] + [1] * pad
        if self.state is not None:  # a hybrid LM: each row's state slot (padded rows: the scratch slot)
            host += list(state_slots) + [self.state.shape[0] - 1] * pad
        for _, rows, src in fed or ():
            host += rows + src
        staged = torch.tensor(host, dtype=torch.long).pin_memory().to(self.ids.device, non_blocking=True)
        self.ids[:bs].copy_(staged[:bs])
        self.pos[:bs].copy_(staged[bs : 2 * bs])
        self.slots[:bs].copy_(staged[2 * bs : 3 * bs])
        self.ctx[:bs].copy_(staged[3 * bs : 4 * bs])
        at = 4 * bs
        if self.state is not None:
            self.state_slots[:bs].copy_(staged[at : at + bs])
            at += bs
        for device_tokens, rows, _ in fed or ():
            n = len(rows)
            self.ids[staged[at : at + n]] = device_tokens[staged[at + n : at + 2 * n]]
            at += 2 * n
        if key is None or key != self._last_key:
            width = max(len(t) for t in tables)
            rows_np = np.full((bs, width), self.scratch, dtype=np.int32)
            for i, t in enumerate(tables):
                rows_np[i, : len(t)] = t
            self.tables[:bs, :width].copy_(torch.from_numpy(rows_np).pin_memory().to(self.ids.device, non_blocking=True))
            self._last_key = key
        graph, out = self.graphs[bs]
        graph.replay()
        return out[:b]
