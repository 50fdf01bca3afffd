"""Cache transfer backends: MM embeddings (E->P) and KV blocks (P->D)."""

from epd.transfer.base import TRANSFERS, TransferBackend, make_transfer

__all__ = ["TRANSFERS", "TransferBackend", "make_transfer"]
