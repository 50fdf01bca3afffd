"""torch.distributed point-to-point transfer (NCCL on GPUs, gloo on CPU): works across nodes.

The sender keeps its blocks; when the driver hands a receiver a batch that pulls them, it also
asks the sender to push (`push`, run on the sender's transfer thread so its compute goes on).
The sender gathers the rows into one contiguous buffer and sends it on the group of that
ordered pair of workers; the receiver receives into a buffer and scatters into its blocks. Sender
and receiver walk the handles in the same order (the batch's), so the pair's messages match.
A group per direction: a pair's pushes each way never queue behind each other on one communicator.
Groups are made at `connect` for peers not met before (a replacement is a new incarnation), every
worker in one global order, so that two workers never wait on each other's other groups.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any, Optional

import torch

from epd.cache.paged import gather_kv, read_rows, scatter_kv, write_rows
from epd.distributed import Incarnation, PairRendezvous, pair_group, pair_store
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
        if not hasattr(self, "me"):  # bound again at a role switch: the same process keeps its groups
            self.ranks: dict[str, list[int]] = {}  # instance -> global ranks by tp rank
            self.me: Incarnation = (endpoint.global_rank, uuid.uuid4().hex[:12])
            self.rdv: Optional[PairRendezvous] = None
            self._store: Any = None
            self.groups: dict[tuple[int, int], tuple[Incarnation, Incarnation, Any]] = {}  # (src, dst) global ranks -> group

    def set_pairs(self, rdv: PairRendezvous) -> None:
        self.rdv = rdv

    def export(self) -> Incarnation:
        return self.me

    def connect(self, peers: dict[Endpoint, Incarnation]) -> None:
        if self.rdv is None:
            raise RuntimeError("transfer=nccl needs the pair rendezvous (set_pairs) before connect")
        ranks: dict[str, dict[int, int]] = {}
        for ep, inc in peers.items():
            ranks.setdefault(ep.instance, {})[ep.rank] = inc[0]
        self.ranks = {inst: [by_rank[r] for r in sorted(by_rank)] for inst, by_rank in ranks.items()}
        incs = {inc[0]: inc for inc in peers.values()}
        self._store = self._store or pair_store(self.rdv)
        wanted = sorted((a, b) for a in incs.values() for b in incs.values() if a[0] != b[0] and self.me in (a, b))
        for src, dst in wanted:
            have = self.groups.get((src[0], dst[0]))
            if have is None or have[:2] != (src, dst):  # a new peer, or a new incarnation of one
                self.groups[(src[0], dst[0])] = (src, dst, pair_group(self.rdv, self._store, src, dst, self.me))
        for key in [k for k in self.groups if k[0] not in incs or k[1] not in incs]:
            del self.groups[key]  # a peer gone for good

    def _group(self, src: int, dst: int) -> Any:
        return self.groups[(src, dst)][2]

    def _shape(self, cache: str, rows: int) -> tuple[int, ...]:
        c = self.caches[cache]
        return (c.shape[0], 2, rows, *c.shape[4:]) if cache == "kv" else (rows, c.shape[-1])

    def push(self, handles: list[TransferHandle], receiver: str) -> None:
        """Send each handle's rows to every rank of `receiver` that pulls from this rank."""
        me = self.endpoint.global_rank
        my_tp = len(self.ranks[self.endpoint.instance])
        targets = [g for r, g in enumerate(self.ranks[receiver]) if r % my_tp == self.endpoint.rank]
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx:
            for h in [part for handle in handles for part in (handle, handle.state) if part is not None]:  # a state after its KV, as pulled
                src = self.caches[h.cache]
                data = (gather_kv(src, h.blocks, h.rows) if h.cache == "kv" else read_rows(src, h.blocks, h.rows)).contiguous()
                for dst in targets:
                    self._group(me, dst).send([data], 1, 0).wait()
            if self.stream is not None:
                self.stream.synchronize()

    def recv(self, handle: TransferHandle, blocks: list[int]) -> None:
        senders = self.ranks[handle.worker]
        src = senders[self.endpoint.rank % len(senders)]
        dst_cache = self.caches[handle.cache]
        buf = torch.empty(self._shape(handle.cache, handle.rows), dtype=dst_cache.dtype, device=dst_cache.device)
        self._group(src, self.endpoint.global_rank).recv([buf], 0, 0).wait()
        if handle.cache == "kv":
            scatter_kv(dst_cache, blocks, buf)
        else:
            write_rows(dst_cache, blocks, buf)
