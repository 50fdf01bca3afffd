"""What the driver sends a worker (batches) and what comes back (results, with worker-clock times).

The simulator produces the same result types, so the pipeline logic that consumes them is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from epd.request import ImageInput, SamplingParams, TokenLogprob

Span = tuple[float, float]


@dataclass
class EncodeItem:
    request_id: str
    image_index: int
    image: ImageInput
    num_tokens: int
    mm_blocks: list[int]  # where the embeddings go on this worker
    send: bool  # prefill runs elsewhere: hand the embeddings to the transfer backend


@dataclass
class EncodeBatch:
    items: list[EncodeItem]


@dataclass
class MMSource:
    """One image's embeddings for prefill: already in local blocks, or a handle to pull into them."""

    num_tokens: int
    blocks: list[int]
    handle: Any = None  # None: local


@dataclass
class PrefillItem:
    request_id: str
    prompt_ids: list[int]
    images: list[MMSource]
    kv_blocks: list[int]
    sampling: SamplingParams
    send_kv: bool  # decode runs elsewhere
    keep_for_decode: bool  # decode runs here: remember the sequence


@dataclass
class PrefillBatch:
    items: list[PrefillItem]
    release: list[str] = field(default_factory=list)


@dataclass
class NewDecodeSeq:
    request_id: str
    kv_handle: Any
    kv_blocks: list[int]
    context_len: int  # tokens already in the KV cache (the prompt)
    last_token: int  # the first token, sampled by prefill
    sampling: SamplingParams
    prompt_ids: Optional[list[int]] = None  # sent only when sampling needs the tokens so far (penalties)


@dataclass
class DecodeBatch:
    step: list[str]  # sequences that take one step
    new: list[NewDecodeSeq] = field(default_factory=list)
    release: list[str] = field(default_factory=list)  # finished or aborted: forget them first


@dataclass
class SwitchBatch:
    """Become a worker of another pool: drop the old caches (and weights the new roles don't use),
    load what they do, allocate the new pool's caches. Sent only to a drained instance."""

    roles: tuple[str, ...]
    pool: Any  # the new pool's PoolConfig
    release: list[str] = field(default_factory=list)


Batch = Union[EncodeBatch, PrefillBatch, DecodeBatch, SwitchBatch]


@dataclass
class EncodedItem:
    request_id: str
    image_index: int
    handle: Any = None
    error: Optional[str] = None
    error_kind: str = "invalid"  # an unreadable image; "internal" when encoding itself failed


@dataclass
class EncodeResult:
    span: Span
    items: list[EncodedItem]


@dataclass
class PrefilledItem:
    request_id: str
    first_token: int
    mm_transfer: Optional[Span] = None
    kv_handle: Any = None
    logprob: Optional[TokenLogprob] = None
    error: Optional[str] = None  # this request failed on the worker; the rest of the batch did not


@dataclass
class PrefillResult:
    span: Span
    items: list[PrefilledItem]


@dataclass
class DecodeResult:
    span: Span
    tokens: dict[str, int]
    kv_transfers: dict[str, Span] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # requests that asked for them
    errors: dict[str, str] = field(default_factory=dict)  # requests that failed this step, alone


@dataclass
class SwitchResult:
    span: Span
    weights_loaded: dict[str, str] = field(default_factory=dict)  # part -> "host copy" | "built" | "kept"


Result = Union[EncodeResult, PrefillResult, DecodeResult, SwitchResult]


@dataclass
class BatchFailure:
    """A worker failed as a whole while running a batch (its process died, a transfer broke): every
    request in it is aborted with this reason. A failure of one request's work comes back as that
    item's error instead (`isolation.isolated`)."""

    reason: str
    time: float
    worker_lost: bool = False  # the worker itself is gone (its process died): its instance leaves service


def pulled_handles(batch: Batch) -> list:
    """The transfer handles a batch pulls, in the order the worker reads them."""
    if isinstance(batch, PrefillBatch):
        return [m.handle for it in batch.items for m in it.images if m.handle is not None]
    if isinstance(batch, DecodeBatch):
        return [n.kv_handle for n in batch.new if n.kv_handle is not None]
    return []
