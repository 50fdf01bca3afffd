"""One stage instance (one worker) as the driver sees it: queues, block pools, busy flag."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

from epd.config import PoolConfig, Role
from epd.stages.blocks import BlockPool, KVBlockManager, MMBlockManager
from epd.stages.encoder_cache import EncoderCache
from epd.stages.prefix_cache import PrefixCache
from epd.stages.state import Hold, RequestState


@dataclass
class EncodeWork:
    state: RequestState
    image_index: int


def _can_allocate(pool: BlockPool, cache, n: int) -> bool:
    """`n` blocks are free, or would be once cached entries nobody references are evicted."""
    return pool.can_allocate(n) or (cache is not None and pool.num_free + cache.evictable >= n)


def _allocate(pool: BlockPool, cache, n: int) -> Optional[list[int]]:
    if cache is not None and not pool.can_allocate(n):
        cache.make_room(n)
    return pool.allocate(n)


def _usage(pool: Optional[BlockPool], cache) -> float:
    """The share of the pool in use, unreferenced cached blocks counted free."""
    if pool is None:
        return 0.0
    cached = cache.evictable if cache is not None else 0
    return (pool.num_blocks - pool.num_free - cached) / pool.num_blocks


class Instance:
    def __init__(
        self, instance_id: str, pool: str, roles: tuple[str, ...], cfg: PoolConfig, prefix_caching: bool = False, keeps_state: bool = False
    ):
        self.id = instance_id
        self.prefix_caching = prefix_caching and not keeps_state  # a cached prefix's KV cannot restore a linear layer's state
        self.keeps_state = keeps_state
        self.configure(pool, roles, cfg)
        self.encode_queue: deque[EncodeWork] = deque()
        self.prefill_queue: deque[RequestState] = deque()
        self.decode_queue: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.pending_release: list[str] = []
        self.outgoing = 0  # outputs sent and not yet pulled by the next stage
        self.inflight = 0  # batches sent to its worker and not completed yet
        self.preparing: set[int] = set()  # of those, encode batches (ids) whose images are still prepared on the host
        self.prefilled_last = False  # its last batch was a prefill (alternating prefill and decode steps)
        self.switching_to: Optional[str] = None  # draining before it becomes a worker of this pool
        self.switch_started = 0.0
        self.failed: Optional[str] = None  # out of service (a role switch failed)

    def configure(self, pool: str, roles: tuple[str, ...], cfg: PoolConfig) -> None:
        """The block pools of the roles it holds (at start, and again after a role switch)."""
        self.pool, self.roles, self.cfg = pool, roles, cfg
        holds_lm = Role.PREFILL in roles or Role.DECODE in roles
        self.kv = KVBlockManager(self.id, cfg.kv_blocks, cfg.kv_block_size) if holds_lm else None
        # A hybrid LM's per-sequence state: one slot a sequence, held beside its KV
        self.state = BlockPool("state", self.id, cfg.state_slot_count, 1) if holds_lm and self.keeps_state else None
        # Where it decodes, at most max_decode_seqs sequences hold KV here: running, or (where it also prefills)
        # prefilled or prefilling beside them. Without the bound a prefill instance that decodes too fills its pool with
        # prompts that cannot run yet, and the running sequences, growing, preempt each other.
        self.seqs = BlockPool("seqs", self.id, cfg.max_decode_seqs, 1) if Role.DECODE in roles else None
        self.mm = MMBlockManager(self.id, cfg.mm_blocks, cfg.mm_block_tokens) if {Role.ENCODE, Role.PREFILL} & set(roles) else None
        self.prefix_cache = PrefixCache(self.kv) if self.prefix_caching and Role.PREFILL in roles else None
        cap = cfg.mm_blocks if cfg.encoder_cache_blocks is None else cfg.encoder_cache_blocks
        self.encoder_cache = EncoderCache(self.mm, cap) if Role.ENCODE in roles and cap > 0 else None

    @property
    def kv_owner(self):
        """What a hold on this instance's KV frees through: the prefix cache, where there is one."""
        return self.prefix_cache if self.prefix_cache is not None else self.kv

    def can_allocate_kv(self, n: int) -> bool:
        return _can_allocate(self.kv, self.prefix_cache, n)

    def allocate_kv(self, n: int) -> Optional[list[int]]:
        """KV blocks, evicting cached prefixes nobody uses when the pool is short."""
        return _allocate(self.kv, self.prefix_cache, n)

    def hold_kv(self, state: RequestState, blocks: list[int]) -> bool:
        """`state` holds `blocks` of this instance's KV, a sequence slot where it decodes and a state slot where
        the LM keeps one; False (the blocks given back) when every slot is taken."""
        taken = []
        for key, pool in ((Hold.seq_slot(self.id), self.seqs), (Hold.state_slot(self.id), self.state)):
            if pool is None:
                continue
            slot = pool.allocate(1)
            if slot is None:
                self.kv_owner.free(blocks)
                for k in taken:
                    state.release(k)
                return False
            state.hold(key, pool, slot)
            taken.append(key)
        state.hold(Hold.kv(self.id), self.kv_owner, blocks)
        return True

    def can_hold_sequence(self) -> bool:
        """A sequence slot is free (or none is needed): a new sequence may take KV here."""
        return self.seqs is None or self.seqs.num_free > 0

    def can_allocate_mm(self, n: int) -> bool:
        return _can_allocate(self.mm, self.encoder_cache, n)

    def allocate_mm(self, n: int) -> Optional[list[int]]:
        """MM blocks, evicting cached images nobody uses when the pool is short."""
        return _allocate(self.mm, self.encoder_cache, n)

    @property
    def busy(self) -> bool:
        return self.inflight > 0

    def drained(self) -> bool:
        """Nothing queued, running, in flight or held: the worker can change role."""
        queues = self.encode_queue or self.prefill_queue or self.decode_queue or self.running
        if not queues:  # cached images and prefixes are kept only while the instance serves
            self._clear_caches()
        pools_free = all(p is None or p.num_free == p.num_blocks for p in (self.kv, self.mm, self.state, self.seqs))
        return not self.busy and not queues and self.outgoing == 0 and pools_free

    def _clear_caches(self) -> None:
        for cache in (self.encoder_cache, self.prefix_cache):
            if cache is not None:
                cache.clear()

    @property
    def kv_usage(self) -> float:
        """Share of the KV pool in use, cached prefixes nobody holds counted free (they are evicted on demand)."""
        return _usage(self.kv, self.prefix_cache)

    @property
    def mm_usage(self) -> float:
        return _usage(self.mm, self.encoder_cache)

    def has(self, role: str) -> bool:
        return role in self.roles

    def load(self) -> int:
        return len(self.encode_queue) + len(self.prefill_queue) + len(self.decode_queue) + len(self.running)

    def take_releases(self) -> list[str]:
        out, self.pending_release = self.pending_release, []
        return out

    def assert_drained(self) -> None:
        self._clear_caches()  # what nobody references is cache, not a leak
        for pool in (self.kv, self.mm, self.state, self.seqs):
            if pool is not None:
                pool.assert_all_free()
        leftovers = [s.rid for s in self.running] + [s.rid for s in self.prefill_queue if not s.done]
        if leftovers:
            raise AssertionError(f"instance {self.id} still holds requests {leftovers[:8]}")
