"""Fixed-size block pools: KV cache blocks (tokens of K/V) and MM blocks (image embedding rows).

The driver owns the accounting; workers only see block ids. At the end of a run every block
must be free again (`assert_all_free`).
"""

from __future__ import annotations

from collections import deque
from typing import Optional


class BlockPool:
    def __init__(self, kind: str, owner: str, num_blocks: int, block_tokens: int):
        if num_blocks < 1 or block_tokens < 1:
            raise ValueError(f"{kind} pool of {owner}: need >= 1 block of >= 1 token, got {num_blocks} x {block_tokens}")
        self.kind, self.owner = kind, owner
        self.num_blocks, self.block_tokens = num_blocks, block_tokens
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> Optional[list[int]]:
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        freed = set(blocks)
        if len(freed) != len(blocks) or not freed <= self._used:
            bad = sorted(freed - self._used) or blocks
            raise RuntimeError(f"{self.kind} block {bad[0]} of {self.owner} freed twice or never allocated")
        self._used -= freed
        self._free.extend(blocks)

    def assert_all_free(self) -> None:
        if self._used:
            raise AssertionError(f"{len(self._used)} {self.kind} blocks of {self.owner} still held: {sorted(self._used)[:8]}")


class KVBlockManager(BlockPool):
    def __init__(self, owner: str, num_blocks: int, block_size: int):
        super().__init__("KV", owner, num_blocks, block_size)


class MMBlockManager(BlockPool):
    def __init__(self, owner: str, num_blocks: int, block_tokens: int):
        super().__init__("MM", owner, num_blocks, block_tokens)
