"""Workers in one process: the receiver copies blocks straight out of the sender's cache tensor."""

from __future__ import annotations

import threading
import weakref

import torch

from epd.cache.block_copy import copy_blocks
from epd.transfer.base import BLOCK_DIM, TRANSFERS, Endpoint, TransferBackend, TransferHandle, matching_blocks

# Caches of every bound worker in this process, by (instance, rank); weak so closed workers vanish.
_CACHES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


class _Caches(dict):
    """A dict that a WeakValueDictionary can hold."""


@TRANSFERS.register("local")
class LocalTransfer(TransferBackend):
    name = "local"
    frees_on_send = False
    block_based = True

    def bind(self, endpoint: Endpoint, caches: dict[str, torch.Tensor]) -> None:
        super().bind(endpoint, caches)
        self._registered = _Caches(caches)  # keeps the registry entry alive as long as this backend
        with _LOCK:
            _CACHES[(endpoint.instance, endpoint.rank)] = self._registered

    def recv(self, handle: TransferHandle, blocks: list[int]) -> None:
        with _LOCK:
            peer = _CACHES.get((handle.worker, self.endpoint.rank))
        if peer is None:
            raise RuntimeError(f"local transfer: worker {handle.worker!r} is not in this process (or has closed)")
        copy_blocks(peer[handle.cache], self.caches[handle.cache], handle.blocks, matching_blocks(handle, blocks), BLOCK_DIM[handle.cache])

    def close(self) -> None:
        with _LOCK:
            _CACHES.pop((self.endpoint.instance, self.endpoint.rank), None)
