"""Encoded images kept by content hash in an encoding instance's MM pool (an LRU cache).

An entry owns the blocks its embeddings are written to. It is made when the image is scheduled for
encoding, so a copy arriving while the first is still being encoded waits for it instead of
encoding it again (the worker runs batches in order: the embeddings are in place before the copy's
batch reads them). Requests that use an entry hold a reference (`free` drops one, as a block
pool's `free` would free the blocks); an entry nobody references stays until its blocks are wanted:
`make_room` evicts the least recently used of those when the pool is short, and the capacity bounds
the blocks entries may keep. An entry whose encoding failed is dropped; its copies fail alike.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from epd.stages.blocks import BlockPool


@dataclass
class _Entry:
    key: str
    blocks: list[int]
    refs: int = 0
    failed: Optional[str] = None  # its encoding failed: no new hits; blocks freed with the last reference


class EncoderCache:
    def __init__(self, pool: BlockPool, capacity_blocks: int):
        self.pool, self.capacity = pool, capacity_blocks
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._by_block: dict[int, _Entry] = {}  # an entry's first block -> the entry (failed ones too)
        self.hits = self.misses = self.evictions = 0

    @property
    def blocks_held(self) -> int:
        return sum(len(e.blocks) for e in self._by_block.values())

    @property
    def evictable(self) -> int:
        return sum(len(e.blocks) for e in self._entries.values() if e.refs == 0)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def lookup(self, key: str) -> Optional[list[int]]:
        """The blocks of `key`'s embeddings (written, or being written by a batch already sent) with a
        reference taken, or None (counted as a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        entry.refs += 1
        self._entries.move_to_end(key)
        return entry.blocks

    def add(self, key: str, n: int) -> Optional[list[int]]:
        """Blocks for a new entry `key` about to be encoded, referenced once (by the request encoding it);
        None when the cache cannot keep `n` more blocks (the caller allocates them uncached)."""
        if key in self._entries or n > self.capacity:
            return None
        while self.blocks_held + n > self.capacity:
            if not self._evict_one():
                return None
        if not self.make_room(n):
            return None
        entry = _Entry(key, self.pool.allocate(n), refs=1)
        self._entries[key] = entry
        self._by_block[entry.blocks[0]] = entry
        return entry.blocks

    def holds(self, blocks: list[int]) -> bool:
        return bool(blocks) and self._by_block.get(blocks[0]) is not None and self._by_block[blocks[0]].blocks == blocks

    def fail(self, blocks: list[int], reason: str) -> None:
        """The encoding that was to fill these blocks failed: no more hits on them."""
        entry = self._by_block[blocks[0]]
        entry.failed = reason
        self._entries.pop(entry.key, None)
        if entry.refs == 0:  # nobody holds it any more (its requests started over before this batch came back)
            del self._by_block[entry.blocks[0]]
            self.pool.free(entry.blocks)

    def failure(self, blocks: list[int]) -> Optional[str]:
        entry = self._by_block.get(blocks[0]) if blocks else None
        return None if entry is None else entry.failed

    def free(self, blocks: list[int]) -> None:
        """A request lets go of an entry's blocks (the BlockPool interface its holds call)."""
        entry = self._by_block[blocks[0]]
        if entry.refs <= 0:
            raise RuntimeError(f"encoder cache entry at MM block {blocks[0]} of {self.pool.owner} released more often than taken")
        entry.refs -= 1
        if entry.failed is not None and entry.refs == 0:
            del self._by_block[entry.blocks[0]]
            self.pool.free(entry.blocks)

    def make_room(self, n: int) -> bool:
        """Evict unreferenced entries, least recently used first, until the pool has `n` free blocks."""
        while not self.pool.can_allocate(n):
            if not self._evict_one():
                return False
        return True

    def clear(self) -> None:
        """Evict every entry nobody references (a drain: the blocks go back to the pool)."""
        while self._evict_one():
            pass

    def _evict_one(self) -> bool:
        key = next((k for k, e in self._entries.items() if e.refs == 0), None)
        if key is None:
            return False
        entry = self._entries.pop(key)
        del self._by_block[entry.blocks[0]]
        self.pool.free(entry.blocks)
        self.evictions += 1
        return True
