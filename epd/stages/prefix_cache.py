"""Prefix caching: KV blocks of prompts already prefilled on an instance, reused by requests that
begin the same way.

A full block is named by a hash chained over the blocks before it and its own content: token ids,
and for image placeholders the image's content hash and row (two prompts with the same placeholder
count but different pictures differ). When a sequence's prefill completes, its full blocks are
registered; a request admitted later takes references to the longest run of its leading blocks found
here and prefills only the rest (at least its last token: the step samples from it). A block nobody
references stays cached until its block is wanted: `make_room` evicts the least recently used.
Holds on the instance's KV free through `free`: a cached block loses a reference, another goes back
to the pool. The worker needs nothing of this: it reads whatever blocks a sequence's table names.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from epd.stages.blocks import BlockPool


@dataclass
class _Block:
    key: bytes
    block: int
    refs: int = 0


def block_hashes(
    tokens: Sequence[int], block_size: int, image_token: int, image_keys: Sequence[str], image_tokens: Sequence[int], prompt_len: int
) -> list[bytes]:
    """The chained hash of each full block of `tokens`. Placeholders (ids `image_token` before
    `prompt_len`) stand for their image's rows: image i's key and the row's index within it."""
    content: list = list(tokens)
    which, row, runs = 0, 0, list(image_tokens)
    for pos in range(min(prompt_len, len(tokens))):
        if tokens[pos] == image_token and which < len(runs):
            content[pos] = (image_keys[which] if which < len(image_keys) else "", row)
            row += 1
            if row == runs[which]:
                which, row = which + 1, 0
    out, prev = [], b""
    for b in range(len(tokens) // block_size):
        prev = hashlib.blake2b(prev + repr(content[b * block_size : (b + 1) * block_size]).encode(), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixCache:
    def __init__(self, pool: BlockPool):
        self.pool = pool
        self._by_key: dict[bytes, _Block] = {}
        self._by_block: dict[int, _Block] = {}
        self._unused: OrderedDict[bytes, _Block] = OrderedDict()  # referenced by nobody, least recently used first

    @property
    def evictable(self) -> int:
        return len(self._unused)

    def match(self, hashes: list[bytes], limit: int) -> list[int]:
        """The cached blocks of the longest leading run of `hashes` (at most `limit` blocks), each with a
        reference taken."""
        found = []
        for key in hashes[:limit]:
            entry = self._by_key.get(key)
            if entry is None:
                break
            entry.refs += 1
            self._unused.pop(key, None)
            found.append(entry.block)
        return found

    def register(self, hashes: list[bytes], blocks: list[int]) -> None:
        """A sequence's first `len(hashes)` blocks now hold that content (its prefill completed); the
        sequence's hold keeps its reference to each block it registers."""
        for key, block in zip(hashes, blocks):
            if key in self._by_key or block in self._by_block:
                continue  # the same content cached in another block already, or this block already
            entry = _Block(key, block, refs=1)
            self._by_key[key] = entry
            self._by_block[block] = entry

    def free(self, blocks: list[int]) -> None:
        """A hold lets go of its blocks (the BlockPool interface): cached ones lose a reference."""
        plain = []
        for b in blocks:
            entry = self._by_block.get(b)
            if entry is None:
                plain.append(b)
                continue
            if entry.refs <= 0:
                raise RuntimeError(f"prefix-cached KV block {b} of {self.pool.owner} released more often than taken")
            entry.refs -= 1
            if entry.refs == 0:
                self._unused[entry.key] = entry
        if plain:
            self.pool.free(plain)

    def make_room(self, n: int) -> bool:
        """Evict unreferenced blocks, least recently used first, until the pool has `n` free."""
        while not self.pool.can_allocate(n):
            if not self._unused:
                return False
            key, entry = self._unused.popitem(last=False)
            del self._by_key[key]
            del self._by_block[entry.block]
            self.pool.free([entry.block])
        return True

    def clear(self) -> None:
        self.make_room(self.pool.num_blocks)
