"""KV block bookkeeping on the router side (plain Python, no torch, no grpc).

When a shard's Info says `requires_block_allocator`, the router owns the shard's paged KV cache:
it hands each request a list of block ids and one KV slot per token position. Slot `s` is row
`s % block_size` of block `s // block_size`. Block 0 is never handed out: the health probe uses it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

RESERVED_BLOCKS = 1  # block 0 belongs to the health probe


def tokens_needed(prompt_tokens: int, max_new_tokens: int, speculate: int = 0) -> int:
    """KV token slots one request can ever use: the prompt, every generated token but the last
    (its K/V is never written), and the speculative lookahead."""
    if prompt_tokens < 1 or max_new_tokens < 1 or speculate < 0:
        raise ValueError(
            f"need prompt_tokens >= 1, max_new_tokens >= 1, speculate >= 0; got "
            f"{prompt_tokens}, {max_new_tokens}, {speculate}"
        )
    return prompt_tokens + max_new_tokens - 1 + speculate


def blocks_needed(prompt_tokens: int, max_new_tokens: int, block_size: int, speculate: int = 0) -> int:
    """ceil((prompt + max_new_tokens - 1 + speculate) / block_size)."""
    return -(-tokens_needed(prompt_tokens, max_new_tokens, speculate) // block_size)


def slots_for(blocks: list[int], block_size: int, n_tokens: int) -> list[int]:
    """One KV slot per token position, filling the blocks in order:
    `[b * block_size + r for b in blocks for r in range(block_size)][:n_tokens]`."""
    if n_tokens > len(blocks) * block_size:
        raise ValueError(f"{n_tokens} tokens do not fit in {len(blocks)} blocks of {block_size}")
    return [b * block_size + r for b in blocks for r in range(block_size)][:n_tokens]


class BlockAllocator:
    """A free list of KV block ids `RESERVED_BLOCKS .. num_blocks - 1`.

    `allocate` is all-or-nothing (None when too few blocks are free); `free` rejects ids that are
    not currently handed out (double free, reserved or out-of-range ids) before changing anything.
    Not thread-safe: the router's serving loop is its only user.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_blocks <= RESERVED_BLOCKS:
            raise ValueError(
                f"a pool of {num_blocks} blocks leaves none after the {RESERVED_BLOCKS} reserved "
                "for the health probe: the shards reported too little KV memory"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(RESERVED_BLOCKS, num_blocks))
        self._allocated: set[int] = set()

    @property
    def capacity(self) -> int:
        """Blocks the allocator can ever hand out at once (the pool minus the reserved block)."""
        return self.num_blocks - RESERVED_BLOCKS

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return len(self._allocated)

    def allocate(self, n_blocks: int) -> list[int] | None:
        """`n_blocks` block ids, or None (and nothing taken) when fewer are free."""
        if n_blocks < 0:
            raise ValueError(f"cannot allocate {n_blocks} blocks")
        if n_blocks > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n_blocks)]
        self._allocated.update(blocks)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Give blocks back; raises ValueError (freeing none) if any id is not handed out."""
        blocks = list(blocks)
        bad = [b for b in blocks if b not in self._allocated]
        if bad or len(set(blocks)) != len(blocks):
            raise ValueError(
                f"cannot free blocks {sorted(set(bad)) or blocks}: not allocated "
                "(double free, reserved block, or unknown id)"
            )
        self._allocated.difference_update(blocks)
        self._free.extend(blocks)
