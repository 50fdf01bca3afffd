"""GPUs of one node: the receiver maps the sender's cache tensors (CUDA IPC) and pulls blocks peer-to-peer.

The sender does nothing at send time (its compute goes on; it keeps the blocks until the pull
is done). With the csrc extension the pull is one kernel launch on the receiver's GPU reading
the peer's memory over NVLink/PCIe; without it, torch's own IPC (storage sharing) and one
peer copy per run of consecutive blocks.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch

from epd.cache.block_copy import copy_blocks_torch
from epd.csrc import block_ops
from epd.transfer.base import BLOCK_DIM, TRANSFERS, Endpoint, TransferBackend, TransferHandle, matching_blocks

log = logging.getLogger(__name__)


@dataclass
class _Peer:
    """One peer cache mapped into this process: a raw pointer (extension) or a tensor (torch IPC)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    ptr: Optional[int] = None
    tensor: Optional[torch.Tensor] = None


def _torch_share(t: torch.Tensor) -> tuple:
    return t.untyped_storage()._share_cuda_()


def _torch_open(shared: tuple, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared_cuda(*shared)
    return torch.empty(0, dtype=dtype, device=storage.device).set_(storage, 0, shape)


@TRANSFERS.register("ipc")
class IPCTransfer(TransferBackend):
    name = "ipc"
    frees_on_send = False
    block_based = True
    chunk_bytes = 0  # the kernel's work per CTA; 0: sized for the device

    def bind(self, endpoint: Endpoint, caches: dict[str, torch.Tensor]) -> None:
        for name, t in caches.items():
            if t.device.type != "cuda":
                raise RuntimeError(
                    f"deployment.transfer=ipc needs CUDA caches; worker {endpoint.instance} holds its {name} cache on {t.device}"
                )
        super().bind(endpoint, caches)
        self.ops = block_ops()
        self.use_ext = self.ops is not None and self.ops.has_cuda()
        self.peers: dict[tuple[str, int, str], _Peer] = {}
        self._opened: dict[bytes, int] = getattr(self, "_opened", {})  # IPC handle -> base pointer, kept across rebinds
        self._exports: dict[Endpoint, Any] = getattr(self, "_exports", {})
        self._lock = threading.Lock()

    def export(self) -> Any:
        out = {}
        for name, t in self.caches.items():
            meta = {"shape": tuple(t.shape), "dtype": t.dtype, "device": t.device.index}
            if self.use_ext:
                handle, offset, _ = self.ops.ipc_export(t)
                meta.update(ext=(handle, offset))
            meta.update(torch=_torch_share(t))
            out[name] = meta
        return out

    def connect(self, peers: dict[Endpoint, Any]) -> None:
        """New exports (at start, and after a worker switched roles and reallocated its caches)."""
        with self._lock:
            new = {ep: ex for ep, ex in peers.items() if ex is not None}
            changed = {ep.instance for ep in set(new) | set(self._exports) if new.get(ep) != self._exports.get(ep)}
            self._exports = new
            self.peers = {k: v for k, v in self.peers.items() if k[0] not in changed}

    def _peer(self, instance: str, cache: str) -> _Peer:
        with self._lock:
            return self._peer_locked(instance, cache)

    def _peer_locked(self, instance: str, cache: str) -> _Peer:
        key = (instance, self.endpoint.rank, cache)
        if key not in self.peers:
            meta = self._find(instance, cache)
            me = self.caches[cache]
            if meta["shape"][: BLOCK_DIM[cache]] != tuple(me.shape[: BLOCK_DIM[cache]]) or meta["shape"][BLOCK_DIM[cache] + 1 :] != tuple(
                me.shape[BLOCK_DIM[cache] + 1 :]
            ):
                raise RuntimeError(
                    f"ipc: {cache} cache layouts differ: {instance} {meta['shape']} vs {self.endpoint.instance} {tuple(me.shape)}"
                )
            if self.use_ext:
                handle, offset = meta["ext"]
                if handle not in self._opened:  # a handle opens once per process; switches may re-export one
                    self._opened[handle] = self.ops.ipc_open(handle, me.device.index)
                base = self._opened[handle]
                self.peers[key] = _Peer(meta["shape"], meta["dtype"], ptr=base + offset)
            else:
                self.peers[key] = _Peer(meta["shape"], meta["dtype"], tensor=_torch_open(meta["torch"], meta["shape"], meta["dtype"]))
        return self.peers[key]

    def _find(self, instance: str, cache: str) -> dict:
        cands = {ep.rank: (ep, ex) for ep, ex in self._exports.items() if ep.instance == instance and cache in ex}
        if not cands:
            raise RuntimeError(f"ipc: no {cache} cache of worker {instance!r} to pull from (connect() not called, or it holds none)")
        _, ex = cands[self.endpoint.rank % len(cands)]  # an E worker (tp 1) serves every P rank
        return ex[cache]

    def recv(self, handle: TransferHandle, blocks: list[int]) -> None:
        peer = self._peer(handle.worker, handle.cache)
        dst = self.caches[handle.cache]
        dim = BLOCK_DIM[handle.cache]
        blocks = matching_blocks(handle, blocks)
        if peer.ptr is not None:
            self.ops.copy_blocks_cuda(peer.ptr, peer.shape[dim], dst, handle.blocks, blocks, dim, self.chunk_bytes)
        else:
            copy_blocks_torch(peer.tensor, dst, handle.blocks, blocks, dim)

    def close(self) -> None:
        """Forget peer views (a role switch rebinds next); the IPC mappings stay open until shutdown."""
        with self._lock:
            self.peers.clear()

    def shutdown(self) -> None:
        self.close()
        for ptr in self._opened.values():
            try:
                self.ops.ipc_close(ptr, self.caches[next(iter(self.caches))].device.index if self.caches else 0)
            except RuntimeError as exc:
                log.warning("ipc: closing a peer mapping failed: %s", exc)
        self._opened.clear()
