"""torch.distributed point-to-point transfer (NCCL on GPUs, gloo on CPU): works across nodes.

The sender keeps its blocks; when the driver hands a receiver a batch that pulls them, it also
asks the sender to push (`push`, run on the sender's transfer thread so its compute goes on).
The sender gathers the rows into one contiguous buffer and sends it on the group of that
ordered pair of ranks; the receiver receives into a buffer and scatters into its blocks. Sender
and receiver walk the handles in the same order (the batch's), so the pair's messages match.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from epd.cache.paged import gather_kv, read_rows, scatter_kv, write_rows
from epd.transfer.base import TRANSFERS, Endpoint, TransferBackend, TransferHandle


@TRANSFERS.register("nccl")
class NCCLTransfer(TransferBackend):
    name = "nccl"
    frees_on_send = False
    needs_push = True

    def bind(self, endpoint: Endpoint, caches: dict[str, torch.Tensor]) -> None:
        super().bind(endpoint, caches)
        dev = next(iter(caches.values())).device if caches else torch.device("cpu")
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.ranks: dict[str, list[int]] = {}  # instance -> global ranks by tp rank

    def export(self) -> int:
        return self.endpoint.global_rank

    def connect(self, peers: dict[Endpoint, int]) -> None:
        ranks: dict[str, dict[int, int]] = {}
        for ep, g in peers.items():
            ranks.setdefault(ep.instance, {})[ep.rank] = g
        self.ranks = {inst: [by_rank[r] for r in sorted(by_rank)] for inst, by_rank in ranks.items()}

    def _shape(self, cache: str, rows: int) -> tuple[int, ...]:
        c = self.caches[cache]
        return (rows, c.shape[-1]) if cache == "mm" else (c.shape[0], 2, rows, *c.shape[4:])

    def push(self, handles: list[TransferHandle], receiver: str) -> None:
        """Send each handle's rows to every rank of `receiver` that pulls from this rank."""
        me = self.endpoint.global_rank
        my_tp = len(self.ranks[self.endpoint.instance])
        targets = [g for r, g in enumerate(self.ranks[receiver]) if r % my_tp == self.endpoint.rank]
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            for h in handles:
                src = self.caches[h.cache]
                data = (read_rows(src, h.blocks, h.rows) if h.cache == "mm" else gather_kv(src, h.blocks, h.rows)).contiguous()
                for dst in targets:
                    dist.send(data, dst=dst, group=self.comm.pair_group(me, dst))
            if self.stream is not None:
                self.stream.synchronize()

    def recv(self, handle: TransferHandle, blocks: list[int]) -> None:
        senders = self.ranks[handle.worker]
        src = senders[self.endpoint.rank % len(senders)]
        dst_cache = self.caches[handle.cache]
        buf = torch.empty(self._shape(handle.cache, handle.rows), dtype=dst_cache.dtype, device=dst_cache.device)
        dist.recv(buf, src=src, group=self.comm.pair_group(src, self.endpoint.global_rank))
        if handle.cache == "mm":
            write_rows(dst_cache, blocks, buf)
        else:
            scatter_kv(dst_cache, blocks, buf)
