"""Driver-side state of one request as it moves through the pools."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from epd.request import Request
from epd.stages.blocks import BlockPool
from epd.stages.work import MMSource


@dataclass(frozen=True)
class Hold:
    """Blocks a request holds on one instance: its KV (`image` None), one image's MM embeddings, or a slot
    that lives and goes with its KV there: a hybrid LM's state slot (`state`), or on an instance that decodes
    its place among the sequences it may hold (`seq`)."""

    instance: str
    image: Optional[int] = None
    state: bool = False
    seq: bool = False

    @staticmethod
    def kv(instance: str) -> Hold:
        return Hold(instance)

    @staticmethod
    def state_slot(instance: str) -> Hold:
        return Hold(instance, None, True)

    @staticmethod
    def seq_slot(instance: str) -> Hold:
        return Hold(instance, None, False, True)

    @staticmethod
    def mm(instance: str, image: int) -> Hold:
        return Hold(instance, image)


@dataclass(eq=False)  # a request is an entity: queues find and remove it by identity, not by comparing every field
class RequestState:
    req: Request
    prompt_ids: list[int]
    image_tokens: list[int]
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per image, read at admission
    image_keys: list[str] = field(default_factory=list)  # content hash per image: the encoder cache's key
    rope: Any = None  # the prompt's M-RoPE layout (Qwen2-VL families), else None
    media: list = field(default_factory=list)  # what E encodes: each video's segments (`epd.video.FrameStack`), then the images
    images_pending: int = 0
    mm: dict[int, MMSource] = field(default_factory=dict)  # image index -> where its embeddings are
    prefill_instance: Optional[str] = None
    decode_instance: Optional[str] = None
    kv_handle: Any = None
    kv_local: bool = False  # decode runs where prefill ran: the KV is already in place
    senders: list[str] = field(default_factory=list)  # instances whose output awaits our pull
    pulling: bool = False  # a batch in flight is pulling from the senders' blocks
    pull_lost: Optional[str] = None  # a sender died during that pull: started over once the pulling batch is back
    output: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob per output token, when asked for
    decode_started: bool = False
    steps_inflight: int = 0  # decode steps dispatched whose tokens have not come back
    stale_steps: dict[str, int] = field(default_factory=dict)  # instance -> steps sent before a preemption: tokens dropped
    prefilled: int = 0  # tokens of the sequence sent to prefill on its prefill instance (chunked prefill)
    mm_rows_done: int = 0  # image-embedding rows those tokens took
    prefix_hit: int = 0  # of them, tokens whose KV the prefix cache had (not computed)
    block_hashes: list = field(default_factory=list)  # its full blocks' chained hashes on its prefill instance
    preemptions: int = 0
    pull_retries: int = 0  # times it started over because a pull of its KV or images failed
    attempt: int = 0  # bumped each time it starts over: results of work sent before are stale
    done: bool = False
    forgotten: bool = False  # its owner is done with it: drop the state once nothing reads its blocks
    holds: dict[Hold, tuple[BlockPool, list[int]]] = field(default_factory=dict)

    @property
    def rid(self) -> str:
        return self.req.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def sequence(self) -> list[int]:
        """The tokens prefill puts in the KV cache: the prompt, and after a preemption what it had sampled."""
        return self.prompt_ids + self.output if self.output else self.prompt_ids

    @property
    def kv_len(self) -> int:
        """Tokens in the KV cache once prefilled: all but the latest sampled token (the next step's input)."""
        return self.prompt_len + max(len(self.output) - 1, 0)

    def hold(self, key: Hold, pool: BlockPool, blocks: list[int]) -> None:
        assert key not in self.holds, key
        self.holds[key] = (pool, blocks)

    def extend(self, key: Hold, blocks: list[int]) -> list[int]:
        """More blocks for a hold (a growing KV): a new list, so a batch already sent keeps the table it had."""
        pool, held = self.holds[key]
        self.holds[key] = (pool, held + blocks)
        return self.holds[key][1]

    def blocks(self, key: Hold) -> list[int]:
        return self.holds[key][1]

    def keys_of(self, instance: str) -> list[Hold]:
        """Holds on `instance`'s blocks: its KV and its images' MM."""
        return [k for k in self.holds if k.instance == instance]

    def release(self, key: Hold) -> None:
        if key in self.holds:
            pool, blocks = self.holds.pop(key)
            pool.free(blocks)
        if key.image is None and not key.state and not key.seq:  # the sequence's slots there go with its KV
            self.release(Hold.state_slot(key.instance))
            self.release(Hold.seq_slot(key.instance))

    def state_slot(self, instance: str) -> Optional[int]:
        held = self.holds.get(Hold.state_slot(instance))
        return held[1][0] if held else None

    def release_all(self) -> None:
        for key in list(self.holds):
            self.release(key)
