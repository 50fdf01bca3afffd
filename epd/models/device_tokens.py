"""Sampled tokens that stay on the device until the host needs them.

A decode step's tokens are the next step's inputs. The worker launches the next step with them still on
the GPU (gathered by row into its input ids) while their copy to the host is under way, so the GPU does
not wait for the host between steps; the step's reply waits for that copy alone (an event), never for
the steps queued behind it on the stream.
"""

from __future__ import annotations

from typing import Optional

import torch

# Rows of a step's input ids taken from earlier steps' device tokens: (tokens, rows of the step, rows of tokens).
Fed = list[tuple[torch.Tensor, list[int], list[int]]]


class PendingTokens:
    """One step's sampled ids: on the device at once, on the host once `values()` returns."""

    def __init__(self, tokens: torch.Tensor):
        self.device = tokens
        self._values: Optional[list[int]] = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event: Optional[torch.cuda.Event] = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = tokens, None

    def values(self) -> list[int]:
        """The ids on the host; waits for their copy only (the GIL is released while it waits)."""
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._host.tolist()
        return self._values


def feed(ids: torch.Tensor, fed: Optional[Fed]) -> None:
    """Overwrite rows of `ids` (on the device) with earlier steps' device tokens."""
    for tokens, rows, src in fed or ():
        ids[torch.tensor(rows, device=ids.device)] = tokens[torch.tensor(src, device=tokens.device)]
