"""`KVBlocks`: the router's KV blocks per request, with the prefix cache in front of the allocator
(plain Python; the scheduler's lock guards it).

A request's `blocks` cover its whole sequence from position 0: the first `len(p.nodes)` are the
prefix cache's (shared, read only), the rest its own. Its slots come from that list (never
`first_slot + arange`). When a cached prefix covers the whole prompt, one block less is used so at
least one token is computed and no shared block is ever written (the recomputed tokens go to the
request's own block). Blocks enter the cache only once the request's prefill has completed (its
first token came back), so a failed, refused or cancelled Prefill caches nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from router_client.blocks import BlockAllocator
from router_client.client import ShardError
from router_client.messages import RouterConfig
from router_client.prefix_cache import CacheKey, Node, PrefixCache
from router_client.requests import Pending
from worker.pb import generate_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class PrefixStats:
    """Prefix-cache counters since start (lookups: admitted requests that could use the cache)."""

    lookups: int = 0
    hits: int = 0  # lookups that matched at least one block
    lookup_tokens: int = 0  # prompt tokens of the lookups
    hit_tokens: int = 0  # of those, tokens not computed again (cache_len)
    evicted_blocks: int = 0
    inserted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of looked-up prompt tokens served from the cache."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class KVBlocks:
    """Allocator + optional prefix cache. `prefix` None: the cache is off."""

    def __init__(self, allocator: BlockAllocator, prefix: PrefixCache | None) -> None:
        self.allocator = allocator
        self.prefix = prefix
        self.stats = PrefixStats()

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    @property
    def evictable_count(self) -> int:
        return self.prefix.evictable_blocks if self.prefix is not None else 0

    @property
    def free_count(self) -> int:
        """Blocks a request can get now: free, or cached and unreferenced (evicted on demand)."""
        return self.allocator.free_count + self.evictable_count

    @property
    def used_count(self) -> int:
        """Blocks held by requests (their own, and cached ones they reference)."""
        return self.allocator.used_count - self.evictable_count

    @property
    def cached_count(self) -> int:
        return self.prefix.cached_blocks if self.prefix is not None else 0

    def _match(self, p: Pending, key: CacheKey | None) -> list[Node]:
        if key is None or self.prefix is None:
            return []
        nodes = self.prefix.match(key, p.handle.prompt_ids)
        if len(nodes) * self.block_size >= p.prompt_tokens:  # compute at least the last block again
            nodes = nodes[:-1]
        return nodes

    def peek(self, p: Pending, key: CacheKey | None) -> int:
        """The cache_len `take(p, key)` would give now."""
        return len(self._match(p, key)) * self.block_size

    def take(self, p: Pending, key: CacheKey | None) -> bool:
        """Give `p` its blocks (reusing a cached prefix under `key`; None: no lookup) and set its
        `cache_len`; False, with nothing taken, when too few blocks are free."""
        nodes = self._match(p, key)
        if nodes:
            assert self.prefix is not None
            self.prefix.acquire(nodes)
        own = self._allocate(p.n_blocks - len(nodes))
        if own is None:
            if nodes:
                assert self.prefix is not None
                self.prefix.release(nodes)
            return False
        p.blocks, p.nodes, p.cache_key = [n.block for n in nodes] + own, nodes, key
        p.cache_len = len(nodes) * self.block_size
        if key is not None and self.prefix is not None:
            self.stats.lookups += 1
            self.stats.hits += bool(nodes)
            self.stats.lookup_tokens += p.prompt_tokens
            self.stats.hit_tokens += p.cache_len
        return True

    def _allocate(self, n: int) -> list[int] | None:
        short = n - self.allocator.free_count
        if short > 0 and self.prefix is not None and self.evictable_count >= short:
            freed = self.prefix.evict(short)
            self.allocator.free(freed)
            self.stats.evicted_blocks += len(freed)
        return self.allocator.allocate(n)

    def computed(self, p: Pending) -> None:
        """`p`'s prefill completed: its full prompt blocks join the cache (when it has a key)."""
        if p.prefilled:
            return
        p.prefilled = True
        if p.cache_key is None or self.prefix is None:
            return
        before = len(p.nodes)
        p.nodes = self.prefix.insert(p.cache_key, p.handle.prompt_ids, p.blocks, p.nodes)
        self.stats.inserted_blocks += len(p.nodes) - before

    def give_back(self, p: Pending) -> None:
        """`p` leaves: drop its references on cached blocks, free its own blocks."""
        if p.nodes:
            assert self.prefix is not None
            self.prefix.release(p.nodes)
        self.allocator.free(p.blocks[len(p.nodes) :])
        p.blocks, p.nodes = [], []

    def clear_cache(self) -> int:
        """Evict every unreferenced cached block; returns how many were freed."""
        if self.prefix is None:
            return 0
        freed = self.prefix.clear()
        self.allocator.free(freed)
        self.stats.evicted_blocks += len(freed)
        return len(freed)

    def summary(self) -> str:
        st = self.stats
        return (
            f"prefix cache: {st.hit_rate:.1%} of prompt tokens reused ({st.hit_tokens}/{st.lookup_tokens}), "
            f"{st.hits}/{st.lookups} requests hit, {self.cached_count} blocks cached "
            f"({self.evictable_count} unreferenced), {st.inserted_blocks} inserted, {st.evicted_blocks} evicted"
        )


class PrefixLog:
    """Logs the prefix cache's hit rate every `interval_s` seconds while it changes (0: never)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = time.monotonic() + interval_s
        self._seen = PrefixStats()

    def maybe_log(self, kv: KVBlocks, lock: threading.Condition) -> None:
        if self.interval_s <= 0 or kv.prefix is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval_s
        with lock:
            if kv.stats == self._seen:
                return
            self._seen = replace(kv.stats)
            line = kv.summary()
        log.info(line)


def choose_prefix_cache(
    config: RouterConfig, info: pb.InfoResponse, health: Callable[[], list[dict[str, Any]]]
) -> tuple[PrefixCache | None, str]:
    """The prefix cache, or None, and why (logged). It needs router-allocated blocks, the model's
    seq_length (its keys hold the NTK alpha) and a KV cache that is not fp8: `health()` is asked
    whether a shard says so in its Health stats (key `kv_cache_dtype`)."""
    c = config
    if not c.prefix_caching:
        return None, "off (disabled)"
    if not info.requires_block_allocator:
        return None, "off (the shards allocate their own KV blocks)"
    if c.seq_length is None:
        return None, "off (the model's seq_length is unknown: set RouterConfig.seq_length)"
    try:
        stats = [v for shard in health() for v in shard.values() if isinstance(v, dict)]
    except ShardError as err:
        log.warning("Health at start failed (%s): assuming the KV cache is not fp8", err)
        stats = []
    kv_dtypes = sorted({str(v["kv_cache_dtype"]) for v in stats if "kv_cache_dtype" in v})
    if any("float8" in d or "fp8" in d for d in kv_dtypes):
        return None, f"off (fp8 KV cache: {kv_dtypes})"
    ntk = f"NTK alpha buckets of seq_length {c.seq_length}" if c.use_dynamic_ntk else "no dynamic NTK"
    return PrefixCache(info.block_size), f"on (keyed by adapter and {ntk})"
