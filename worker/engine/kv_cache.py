"""The paged KV cache: per layer, K and V as [num_blocks, block_size, kv_heads_per_shard, head_dim].

Slot `s` is row `s % block_size` of block `s // block_size`. Blocks are owned either by the router
(`requires_block_allocator=true`: requests arrive with blocks and slots) or, for requests that come
without blocks (Warmup, standalone use), by the shard's own allocator over a reserved tail of blocks
that is never reported to the router.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write new keys/values [T, heads, head_dim] into their slots [T] (reference implementation)."""
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slots, v.to(v_cache.dtype))


@dataclass
class KVCache:
    num_layers: int
    num_blocks: int
    block_size: int
    num_heads: int  # per shard
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layers:
            shape = (self.num_blocks, self.block_size, self.num_heads, self.head_dim)
            self.layers = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                            torch.zeros(shape, dtype=self.dtype, device=self.device))
                           for _ in range(self.num_layers)]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_heads * head_dim * elem


class BlockAllocator:
    """Free list over blocks [first, first + count): the shard's own blocks for requests without any.

    Plain Python (no torch), so it is easy to test; `allocate` is all-or-nothing.
    """

    def __init__(self, first: int, count: int):
        self.first = first
        self.count = count
        self._free = list(range(first + count - 1, first - 1, -1))  # pop() hands out the lowest first

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"need {n} KV blocks, only {len(self._free)} of the shard's {self.count} are free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self.first <= b < self.first + self.count:
                raise ValueError(f"block {b} is not one of the shard's own blocks")
        self._free.extend(sorted(blocks, reverse=True))
