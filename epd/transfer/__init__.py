"""Cache transfer backends: MM embeddings (E->P) and KV blocks (P->D)."""

from epd.transfer.base import BLOCK_DIM, TRANSFERS, Endpoint, TransferBackend, TransferHandle, make_transfer, transfer_class

__all__ = ["BLOCK_DIM", "TRANSFERS", "Endpoint", "TransferBackend", "TransferHandle", "make_transfer", "transfer_class"]
