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
    cached: bool = False  # the blocks hold its embeddings already (an encoder-cache hit): nothing to encode
    attempt: int = 0  # the request's attempt it was scheduled for (a result for an earlier one is dropped)


@dataclass
class EncodeBatch:
    items: list[EncodeItem]


def prepared_first(batch) -> bool:
    """An encode batch: its images are prepared on its worker's host (decoded, resized) before it joins the
    worker's batch order, so the steps sent after it are not held up by host work. (A batch of encoder-cache
    hits has nothing to prepare and passes straight through; it goes the same way so that the batches queued
    for the device stay bounded.)"""
    return isinstance(batch, EncodeBatch)


@dataclass
class MMSource:
    """One image's embeddings for prefill: already in local blocks, or a handle to pull into them."""

    num_tokens: int
    blocks: list[int]
    handle: Any = None  # None: local


@dataclass
class PrefillItem:
    """One chunk of a sequence's prefill: `prompt_ids` are its tokens, the sequence's positions
    [start, start + len(prompt_ids)). The chunk that reaches `total` samples the next token."""

    request_id: str
    prompt_ids: list[int]
    images: list[MMSource]  # all of the sequence's images; their handles are pulled with its first chunk
    kv_blocks: list[int]
    sampling: SamplingParams
    send_kv: bool  # decode runs elsewhere
    keep_for_decode: bool  # decode runs here: remember the sequence
    start: int = 0  # tokens of the sequence already in the KV cache (earlier chunks)
    total: Optional[int] = None  # the sequence's length; None: this chunk is all of it
    mm_offset: int = 0  # image-embedding rows that belong to earlier chunks
    prompt_end: Optional[int] = None  # the prompt's length: placeholder ids past it were sampled, not images
    prompt: Optional[list[int]] = None  # the request's prompt, on the last chunk when sampling reads it (penalties)
    generated: list[int] = field(default_factory=list)  # tokens sampled before a preemption (the sequence's tail)
    attempt: int = 0  # the request's attempt it was scheduled for (a result for an earlier one is dropped)
    rope: Any = None  # the sequence's M-RoPE layout (`epd.models.mrope.RopeLayout`), for families that use one
    state_slot: Optional[int] = None  # a hybrid LM: the slot of the worker's state pool it carries its state in

    @property
    def end(self) -> int:
        return self.start + len(self.prompt_ids)

    @property
    def final(self) -> bool:
        return self.total is None or self.end >= self.total


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
    last_token: int  # the latest token, sampled by prefill
    sampling: SamplingParams
    prompt_ids: Optional[list[int]] = None  # sent only when sampling needs the tokens so far (penalties)
    output_ids: Optional[list[int]] = None  # the tokens sampled so far, when more than one (a recomputed sequence)
    rope: Any = None  # the sequence's M-RoPE layout, for families that use one
    state_slot: Optional[int] = None  # a hybrid LM: where its state goes in this worker's pool


@dataclass
class DecodeBatch:
    step: list[str]  # sequences that take one step
    new: list[NewDecodeSeq] = field(default_factory=list)
    release: list[str] = field(default_factory=list)  # finished, aborted or preempted: forget them first
    grow: dict[str, list[int]] = field(default_factory=dict)  # KV blocks appended to a sequence's table first


@dataclass
class MixedBatch:
    """One forward over an instance's running decodes and prefill chunks (chunked prefill where the
    instance both prefills and decodes: decodes first, chunks up to the step's token budget)."""

    decode: DecodeBatch
    prefill: PrefillBatch


@dataclass
class SwitchBatch:
    """Become a worker of another pool: drop the old caches (and weights the new roles don't use),
    load what they do, allocate the new pool's caches. Sent only to a drained instance."""

    roles: tuple[str, ...]
    pool: Any  # the new pool's PoolConfig
    release: list[str] = field(default_factory=list)


Batch = Union[EncodeBatch, PrefillBatch, DecodeBatch, MixedBatch, SwitchBatch]


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
    host_wait: float = 0.0  # seconds of the span spent waiting for its images' host preparation
    prep_begin: Optional[float] = None  # when its images' host preparation began (before the span: the encode stage's service)
    compiled: int = 0  # kernels the worker compiled while it ran the batch (`kernels.compilations`)


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
    compiled: int = 0


@dataclass
class DecodeResult:
    span: Span
    tokens: dict[str, int]
    kv_transfers: dict[str, Span] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # requests that asked for them
    errors: dict[str, str] = field(default_factory=dict)  # requests that failed this step, alone
    compiled: int = 0  # a mixed step's: here, on its decode part


@dataclass
class MixedResult:
    decode: DecodeResult
    prefill: PrefillResult

    @property
    def span(self) -> Span:
        return self.decode.span

    @property
    def compiled(self) -> int:
        return self.decode.compiled


@dataclass
class SwitchResult:
    span: Span
    weights_loaded: dict[str, str] = field(default_factory=dict)  # part -> "host copy" | "built" | "kept"
    compiled: int = 0


Result = Union[EncodeResult, PrefillResult, DecodeResult, MixedResult, SwitchResult]


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
    if isinstance(batch, MixedBatch):  # the worker pulls the decodes' KV first
        return pulled_handles(batch.decode) + pulled_handles(batch.prefill)
    return []


def request_ids(batch: Batch) -> list[str]:
    """Every request a batch holds work of, each once."""
    if isinstance(batch, (EncodeBatch, PrefillBatch)):
        ids = [i.request_id for i in batch.items]
    elif isinstance(batch, DecodeBatch):
        ids = list(batch.step) + [n.request_id for n in batch.new]
    elif isinstance(batch, MixedBatch):
        ids = request_ids(batch.decode) + request_ids(batch.prefill)
    else:
        ids = []
    return list(dict.fromkeys(ids))
