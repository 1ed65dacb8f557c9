"""The router's prefix cache: a radix tree of KV blocks (plain Python, no torch, no grpc).

Each node is one full block of prompt tokens and the KV block that holds their K/V. A node's
children continue its token sequence one block further. There is one root per `CacheKey` =
(adapter index, NTK alpha): adapter indices are never reused, so two adapters never share KV, and
Qwen stores K after RoPE with the sequence's dynamic-NTK alpha, so KV computed for a prompt in one
`seq_length` bucket is wrong for a prompt in another.

Ownership: a node owns its block (the router's BlockAllocator still counts it as handed out).
Requests take a reference on every node of the path they use; a request holds a node's ancestors
too, so `refs(parent) >= refs(child)` and an unreferenced node heads an unreferenced subtree.
Unreferenced leaves are evicted least recently used first, only when blocks run short. The same
tree serves every tensor-parallel shard: they all store the same blocks.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

CacheKey = tuple[int, float]  # (adapter index, dynamic-NTK alpha)


def ntk_alpha(prompt_len: int, seq_length: int, use_dynamic_ntk: bool) -> float:
    """The alpha the shard fixes at prefill (worker/ops.py `ntk_alpha`, spec/qwen-v1.md): 1 when
    L <= S or NTK is off, else max(2 ** ceil(log2(L / S) + 1) - 1, 1): 3 for L <= 2S, 7 for L <= 4S, ..."""
    if not use_dynamic_ntk or prompt_len <= seq_length:
        return 1.0
    context_value = math.log(prompt_len / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


@dataclass(eq=False)
class Node:
    """One cached block: `tokens` (block_size prompt tokens) whose K/V sit in KV block `block`."""

    tokens: tuple[int, ...]
    block: int
    parent: Node | None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    refs: int = 0
    last_used: int = 0  # a logical clock: the tree's tick at the last acquire/release


class PrefixCache:
    """Radix tree of full prompt blocks, one root per CacheKey. Not thread-safe: the scheduler's
    lock guards it."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._roots: dict[CacheKey, Node] = {}
        self._nodes: set[Node] = set()  # every non-root node
        self._leaves: set[Node] = set()  # unreferenced nodes without children: the eviction candidates
        self._unreferenced = 0
        self._tick = 0

    @property
    def cached_blocks(self) -> int:
        """Blocks the tree owns (referenced or not)."""
        return len(self._nodes)

    @property
    def evictable_blocks(self) -> int:
        """Blocks no request references: all of them can be evicted, leaves first."""
        return self._unreferenced

    def _chunks(self, tokens: list[int], n_blocks: int) -> list[tuple[int, ...]]:
        bs = self.block_size
        return [tuple(tokens[i * bs : (i + 1) * bs]) for i in range(n_blocks)]

    def match(self, key: CacheKey, tokens: list[int]) -> list[Node]:
        """The nodes of the longest cached prefix of `tokens` made of whole blocks (no references taken)."""
        node = self._roots.get(key)
        out: list[Node] = []
        if node is None:
            return out
        for chunk in self._chunks(tokens, len(tokens) // self.block_size):
            node = node.children.get(chunk)
            if node is None:
                break
            out.append(node)
        return out

    def acquire(self, nodes: list[Node]) -> None:
        """Take one reference on each node (a path from its root, as `match` returns it)."""
        self._tick += 1
        for n in nodes:
            if n.refs == 0:
                self._unreferenced -= 1
                self._leaves.discard(n)
            n.refs += 1
            n.last_used = self._tick

    def release(self, nodes: list[Node]) -> None:
        """Drop one reference from each node; raises ValueError (changing nothing) on an unreferenced one."""
        if any(n.refs < 1 for n in nodes):
            raise ValueError("release of a prefix-cache node that holds no reference")
        self._tick += 1
        for n in nodes:
            n.refs -= 1
            n.last_used = self._tick
            if n.refs == 0:
                self._unreferenced += 1
                if not n.children:
                    self._leaves.add(n)

    def insert(self, key: CacheKey, tokens: list[int], blocks: list[int], held: list[Node]) -> list[Node]:
        """Hand the computed full prompt blocks of one request to the tree.

        `blocks[i]` holds the K/V of `tokens[i*bs:(i+1)*bs]`; `held` are the nodes the request
        already references (its matched prefix, `blocks[:len(held)]`). Blocks after it become new
        nodes, referenced once by the request, until a block whose tokens another request cached
        first: that block and the ones after it stay the request's own. Returns every node the
        request now references (`held` first); their blocks belong to the tree from now on."""
        n_full = min(len(tokens) // self.block_size, len(blocks))
        if any(h.block != b for h, b in zip(held, blocks)):
            raise ValueError("held prefix-cache nodes do not match the request's first blocks")
        node = held[-1] if held else self._roots.setdefault(key, Node((), -1, None))
        out = list(held)
        self._tick += 1
        for i, chunk in enumerate(self._chunks(tokens, n_full)[len(held) :], start=len(held)):
            if chunk in node.children:  # a duplicate: keep ours private, stop here
                break
            child = Node(chunk, blocks[i], node, refs=1, last_used=self._tick)
            node.children[chunk] = child  # `node` is held by the request (or a root): never a leaf to evict
            self._nodes.add(child)
            out.append(child)
            node = child
        return out

    def evict(self, n_blocks: int) -> list[int]:
        """Remove up to `n_blocks` unreferenced leaves, least recently used first (a parent left
        childless and unreferenced becomes a candidate). Returns the freed block ids."""
        heap = [(n.last_used, id(n), n) for n in self._leaves]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < n_blocks:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None and node.refs == 0 and not node.children
            del parent.children[node.tokens]
            self._nodes.discard(node)
            self._leaves.discard(node)
            self._unreferenced -= 1
            freed.append(node.block)
            if parent.parent is not None and parent.refs == 0 and not parent.children:
                self._leaves.add(parent)
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        self._roots = {k: r for k, r in self._roots.items() if r.children}
        return freed

    def clear(self) -> list[int]:
        """Evict every unreferenced block; returns their ids."""
        return self.evict(len(self._nodes))
