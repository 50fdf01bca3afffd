"""The transfer interface: the sender turns a tensor into a handle, the receiver pulls it.

`frees_on_send`: the data was copied out at send time, so the sender's blocks are free at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from epd.registry import Registry


class TransferBackend(ABC):
    name: str
    frees_on_send: bool = True

    @abstractmethod
    def send(self, tensor: torch.Tensor) -> Any: ...

    @abstractmethod
    def recv(self, handle: Any, device: torch.device) -> torch.Tensor: ...


TRANSFERS: Registry[type[TransferBackend]] = Registry("transfer backend")


@TRANSFERS.register("local")
class LocalTransfer(TransferBackend):
    """Workers in one process: the handle is a private copy of the tensor."""

    name = "local"

    def send(self, tensor: torch.Tensor) -> Any:
        return tensor.clone()

    def recv(self, handle: Any, device: torch.device) -> torch.Tensor:
        return handle.to(device)


def make_transfer(name: str) -> TransferBackend:
    if name == "object_store":
        from epd.transfer import object_store  # noqa: F401  (imports ray)
    return TRANSFERS.get(name)()
