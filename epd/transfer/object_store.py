"""Ray object store transfer: works everywhere (CPU, across nodes); data goes through host memory.

Moves token rows, not blocks, so sender and receiver may use different block sizes.
"""

from __future__ import annotations

import ray

from epd.cache.paged import gather_kv, read_rows, scatter_kv, write_rows
from epd.transfer.base import TRANSFERS, TransferBackend, TransferHandle


@TRANSFERS.register("object_store")
class ObjectStoreTransfer(TransferBackend):
    name = "object_store"

    def send(self, cache: str, blocks: list[int], rows: int) -> TransferHandle:
        src = self.caches[cache]
        data = gather_kv(src, blocks, rows) if cache == "kv" else read_rows(src, blocks, rows)
        # A list keeps Ray from resolving the ref when the driver passes the handle on.
        return TransferHandle(self.endpoint.instance, cache, list(blocks), rows, [ray.put(data.detach().cpu())])

    def recv(self, handle: TransferHandle, blocks: list[int]) -> None:
        dst = self.caches[handle.cache]
        data = ray.get(handle.payload[0]).to(dst.device)
        if handle.cache == "kv":
            scatter_kv(dst, blocks, data)
        else:
            write_rows(dst, blocks, data)
