"""The transfer interface between a sending and a receiving worker.

A backend is bound to its worker's caches ("mm": [blocks, block_tokens, hidden], "kv":
[layers, 2, blocks, block_size, kv_heads, head_dim], and for a hybrid LM "state": [slots, 1, numel], rows
like "mm"). The sender turns blocks into a
`TransferHandle`, the driver passes the handle to the receiver, and the receiver pulls the data
into its own blocks.

`frees_on_send`: the data was copied out at send time, so the sender's blocks are free at once.
Otherwise the sender keeps them until the receiver's batch that pulls them has completed.
`needs_push`: the sender takes part in the copy (NCCL): the driver asks it to push when it
hands the receiver a batch that pulls.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from epd.registry import Registry

BLOCK_DIM = {"mm": 0, "kv": 2, "state": 0}  # where the block index sits in each cache's layout (a state slot: one row)


@dataclass
class TransferHandle:
    worker: str  # the sending instance
    cache: str  # "mm" | "kv"
    blocks: list[int]  # the sender's blocks
    rows: int  # tokens in them
    payload: Any = None  # backend data (e.g. an object ref); None when the receiver pulls from the sender's blocks
    state: Optional[TransferHandle] = None  # with a hybrid LM's KV: the sequence's state slot, pulled after it


@dataclass(frozen=True)
class Endpoint:
    """Who a worker process is: its instance, its rank within the instance (tensor parallelism) and globally."""

    instance: str
    rank: int = 0
    tp: int = 1
    global_rank: int = 0


class TransferBackend(ABC):
    name: ClassVar[str]
    frees_on_send: ClassVar[bool] = True
    needs_push: ClassVar[bool] = False
    block_based: ClassVar[bool] = False  # copies whole blocks: sender and receiver block sizes must match

    def bind(self, endpoint: Endpoint, caches: dict[str, torch.Tensor]) -> None:
        self.endpoint, self.caches = endpoint, caches

    def send(self, cache: str, blocks: list[int], rows: int) -> TransferHandle:
        """Hand `rows` tokens in `blocks` of this worker's `cache` to some receiver."""
        return TransferHandle(self.endpoint.instance, cache, list(blocks), rows)

    @abstractmethod
    def recv(self, handle: TransferHandle, blocks: list[int]) -> None:
        """Pull the data behind `handle` into `blocks` of this worker's cache of the same kind."""

    def recv_many(self, pulls: list[tuple[TransferHandle, list[int]]]) -> None:
        """Several pulls at once (all images of a request): backends that copy blocks merge those
        from one sender into one copy (one launch on GPUs)."""
        for handle, blocks in merge_by_sender(pulls) if self.block_based else pulls:
            self.recv(handle, blocks)

    def export(self) -> Any:
        """What peers need to reach this worker (IPC handles); None when nothing."""
        return None

    def connect(self, peers: dict[Endpoint, Any]) -> None:
        """Every worker's `export()`, keyed by endpoint."""
        return None

    def close(self) -> None:
        """Unbind from the caches (before a role switch reallocates them)."""
        return None

    def shutdown(self) -> None:
        """The worker is going away: release everything."""
        self.close()


def matching_blocks(handle: TransferHandle, blocks: list[int]) -> list[int]:
    """The receiver's first blocks, one per sender block (decode reserves room for the output too)."""
    if len(blocks) < len(handle.blocks):
        raise ValueError(f"{handle.cache} transfer from {handle.worker}: {len(handle.blocks)} blocks sent, {len(blocks)} to receive them")
    return blocks[: len(handle.blocks)]


def merge_by_sender(pulls: list[tuple[TransferHandle, list[int]]]) -> list[tuple[TransferHandle, list[int]]]:
    """One (handle, blocks) per sender and cache: the block lists of its pulls concatenated, in order."""
    merged: dict[tuple[str, str], tuple[TransferHandle, list[int]]] = {}
    for handle, blocks in pulls:
        key = (handle.worker, handle.cache)
        dst = matching_blocks(handle, blocks)
        if key not in merged:
            merged[key] = (TransferHandle(handle.worker, handle.cache, list(handle.blocks), handle.rows), list(dst))
        else:
            merged[key][0].blocks.extend(handle.blocks)
            merged[key][1].extend(dst)
    return list(merged.values())


TRANSFERS: Registry[type[TransferBackend]] = Registry("transfer backend")


_MODULES = ("local", "object_store", "ipc", "nccl")


def transfer_class(name: str) -> type[TransferBackend]:
    """The backend class (the driver reads its properties without instantiating it)."""
    if name not in _MODULES:
        raise ValueError(f"unknown transfer backend {name!r}; known: {', '.join(_MODULES)}")
    importlib.import_module(f"epd.transfer.{name}")
    return TRANSFERS.get(name)


def make_transfer(name: str) -> TransferBackend:
    return transfer_class(name)()
