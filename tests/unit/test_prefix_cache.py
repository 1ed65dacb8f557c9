"""The router's prefix cache: the radix tree (router_client/prefix_cache.py), the blocks it hands out
with the allocator (router_client/kv.py), its NTK-alpha keys against the shard's own alpha, and the
model facts the router reads from config.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from router_client.blocks import BlockAllocator
from router_client.kv import KVBlocks
from router_client.model_facts import read_model_facts
from router_client.prefix_cache import PrefixCache, ntk_alpha
from router_client.requests import Pending, RequestHandle
from worker.pb import generate_pb2 as pb

BS = 4
BASE = (0, 1.0)  # (adapter index, alpha)


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def cached(cache: PrefixCache, key, tokens: list[int]) -> list[int]:
    return [n.block for n in cache.match(key, tokens)]


# ------------------------------------------------------------------------------ keys: the NTK alpha


def test_alpha_key_is_the_shards_alpha_for_every_prompt_length() -> None:
    from worker.ops import ntk_alpha as shard_alpha  # what the shard fixes at prefill

    for seq_length in (7, 256, 2048):
        for length in range(1, 9 * seq_length + 2, max(1, seq_length // 64)):
            for on in (True, False):
                assert ntk_alpha(length, seq_length, on) == shard_alpha(length, seq_length, on), (length, seq_length)
        for edge in (seq_length, seq_length + 1, 2 * seq_length, 2 * seq_length + 1, 4 * seq_length):
            assert ntk_alpha(edge, seq_length, True) == shard_alpha(edge, seq_length, True)


def test_alpha_buckets_follow_the_spec() -> None:
    """spec/qwen-v1.md: alpha 1 up to S, then 2^ceil(log2(L/S) + 1) - 1: 3 up to 2S, 7 up to 4S."""
    s = 2048
    assert [ntk_alpha(n, s, True) for n in (1, 1000, 2048)] == [1.0, 1.0, 1.0]
    assert [ntk_alpha(n, s, True) for n in (2049, 3000, 4096)] == [3.0, 3.0, 3.0]
    assert [ntk_alpha(n, s, True) for n in (4097, 8192, 8193)] == [7.0, 7.0, 15.0]
    assert ntk_alpha(3000, s, False) == 1.0


# ------------------------------------------------------------------------------ the radix tree


def test_match_is_the_longest_whole_block_prefix_under_the_same_key() -> None:
    cache = PrefixCache(BS)
    prompt = toks(10)  # two full blocks and a partial one
    nodes = cache.insert(BASE, prompt, [5, 6, 7], [])
    assert [n.block for n in nodes] == [5, 6]  # the partial third block is never cached
    assert cached(cache, BASE, prompt) == [5, 6]
    assert cached(cache, BASE, toks(8) + [99, 98]) == [5, 6]
    assert cached(cache, BASE, toks(6)) == [5]  # only whole blocks match
    assert cached(cache, BASE, [0, 1, 2, 99, 4, 5, 6, 7]) == []  # first block differs
    assert cached(cache, (1, 1.0), prompt) == []  # another adapter
    assert cached(cache, (0, 3.0), prompt) == []  # another NTK alpha
    assert cached(cache, BASE, toks(3)) == []


def test_insert_extends_a_held_prefix_and_stops_at_a_duplicate() -> None:
    cache = PrefixCache(BS)
    first = cache.insert(BASE, toks(8), [1, 2], [])
    cache.acquire(first[:1])  # a second request matched block 1 only
    cache.release(first)
    second = cache.insert(BASE, toks(16), [1, 9, 10, 11], first[:1])
    assert [n.block for n in second] == [1]  # its block 9 repeats block 2's tokens: 9.. stay its own
    assert cached(cache, BASE, toks(16)) == [1, 2]
    other = cache.insert(BASE, toks(8, 100), [3, 4], [])
    assert [n.block for n in other] == [3, 4] and cache.cached_blocks == 4
    with pytest.raises(ValueError):
        cache.insert(BASE, toks(8), [7, 8], second)  # held nodes must be the request's first blocks


def test_refcounts_protect_blocks_from_eviction() -> None:
    cache = PrefixCache(BS)
    a = cache.insert(BASE, toks(8), [1, 2], [])  # held once by its request
    assert cache.evictable_blocks == 0 and cache.evict(10) == []
    cache.acquire(a)  # a second user
    cache.release(a)
    assert cache.evict(10) == []  # still held once
    cache.release(a)
    assert cache.evictable_blocks == 2
    with pytest.raises(ValueError):
        cache.release(a)  # no reference left to drop
    assert sorted(cache.evict(10)) == [1, 2] and cache.cached_blocks == 0
    assert cached(cache, BASE, toks(8)) == []


def test_eviction_takes_unreferenced_leaves_least_recently_used_first() -> None:
    cache = PrefixCache(BS)
    old = cache.insert(BASE, toks(8), [1, 2], [])
    new = cache.insert(BASE, toks(8, 50), [3, 4], [])
    held = cache.insert((2, 1.0), toks(8, 90), [5, 6], [])
    cache.release(old)
    cache.release(new)
    again = cache.match(BASE, toks(8))  # a later request reuses `old`'s blocks: now `new`'s are older
    cache.acquire(again)
    cache.release(again)
    assert cache.evict(1) == [4]  # the least recently used leaf
    assert cache.evict(1) == [3]  # its parent became an unreferenced leaf, still older than block 2
    assert cache.evict(5) == [2, 1]  # a leaf before its parent; `held` is never evicted
    assert cache.cached_blocks == 2 and cached(cache, (2, 1.0), toks(8, 90)) == [5, 6]
    cache.release(held)
    assert sorted(cache.clear()) == [5, 6] and cache.cached_blocks == 0


def test_a_parent_of_a_referenced_node_is_never_evicted() -> None:
    cache = PrefixCache(BS)
    cache.release(cache.insert(BASE, toks(4), [1], []))
    held = cache.match(BASE, toks(4))
    cache.acquire(held)
    b = cache.insert(BASE, toks(12), [1, 2, 3], held)
    assert [n.block for n in b] == [1, 2, 3]
    assert cache.evict(10) == [] and cache.evictable_blocks == 0
    cache.release(b)
    assert cache.evict(1) == [3]


# ------------------------------------------------------------------------------ blocks per request


def pending(prompt: list[int], max_new: int = 3, rid: int = 0) -> Pending:
    n_tokens = len(prompt) + max_new - 1
    return Pending(RequestHandle(rid, prompt), pb.Request(id=rid), -(-n_tokens // BS), n_tokens)


def kv_blocks(n_blocks: int = 9) -> KVBlocks:
    return KVBlocks(BlockAllocator(n_blocks, BS), PrefixCache(BS))


def test_a_second_request_reuses_the_computed_prefix_from_position_0() -> None:
    kv = kv_blocks()
    a = pending(toks(10))
    assert kv.take(a, BASE) and a.cache_len == 0 and len(a.blocks) == 3
    kv.computed(a)  # its first token came back
    b = pending(toks(8) + [70, 71, 72], rid=1)
    assert kv.take(b, BASE)
    assert b.cache_len == 8 and b.blocks[:2] == a.blocks[:2] and b.blocks[2] not in a.blocks
    assert len(b.blocks) == b.n_blocks == 4  # blocks still cover the whole sequence
    assert kv.stats.hits == 1 and kv.stats.hit_tokens == 8 and kv.stats.lookup_tokens == 21
    kv.give_back(a)
    kv.give_back(b)
    assert kv.used_count == 0 and kv.free_count == kv.capacity and kv.cached_count == 2
    assert kv.clear_cache() == 2 and kv.allocator.free_count == kv.capacity  # no block leaked


def test_a_whole_cached_prompt_still_computes_its_last_block_in_a_block_of_its_own() -> None:
    kv = kv_blocks()
    a = pending(toks(8))
    assert kv.take(a, BASE)
    kv.computed(a)
    kv.give_back(a)
    b = pending(toks(8), rid=1)
    assert kv.take(b, BASE)
    assert b.cache_len == 4 and len(b.nodes) == 1  # not 8 (or 7): the last block is recomputed...
    assert b.blocks[1] not in a.blocks  # ...into a block no one else reads
    c = pending(toks(4), rid=2)
    assert kv.take(c, BASE) and c.cache_len == 0  # one block, all of it cached: computed again


def test_blocks_never_computed_are_never_cached() -> None:
    """A request whose Prefill failed, was refused or cancelled leaves without `computed`."""
    kv = kv_blocks()
    a = pending(toks(12))
    assert kv.take(a, BASE)
    kv.give_back(a)
    assert kv.cached_count == 0 and kv.allocator.free_count == kv.capacity
    b = pending(toks(12), rid=1)
    assert kv.take(b, BASE) and b.cache_len == 0


def test_requests_without_a_key_neither_read_nor_feed_the_cache() -> None:
    kv = kv_blocks()
    a = pending(toks(8))
    assert kv.take(a, BASE)
    kv.computed(a)
    b = pending(toks(8) + [1], rid=1)
    assert kv.take(b, None) and b.cache_len == 0  # e.g. it asks for prefill logprobs
    kv.computed(b)
    kv.give_back(b)
    assert kv.cached_count == 2 and kv.stats.lookups == 1


def test_unreferenced_cached_blocks_are_evicted_when_blocks_run_short() -> None:
    kv = kv_blocks(n_blocks=7)  # 6 usable
    a = pending(toks(12), max_new=1)
    assert kv.take(a, BASE)
    kv.computed(a)
    kv.give_back(a)
    assert kv.cached_count == 3 and kv.free_count == 6
    b = pending(toks(20, 100), max_new=1, rid=1)  # 5 blocks: 3 free + 2 evicted
    assert kv.take(b, BASE)
    assert kv.cached_count == 1 and kv.stats.evicted_blocks == 2
    assert kv.take(pending(toks(8, 200), max_new=1, rid=2), BASE) is False  # 1 evictable, 2 needed
    assert kv.cached_count == 1  # a refused take evicts nothing it cannot use
    kv.give_back(b)
    assert kv.clear_cache() == 1 and kv.allocator.free_count == kv.capacity


# ------------------------------------------------------------------------------ model facts


@pytest.mark.parametrize(
    "raw",
    [
        {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16, "seq_length": 7},
        {"n_embd": 8, "n_head": 2, "n_layer": 1, "ffn_hidden_size": 16, "seq_length": 300},
        {"n_embd": 8, "n_head": 2, "n_layer": 1, "ffn_hidden_size": 16, "seq_length": 9, "use_dynamic_ntk": True},
        {"hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1, "intermediate_size": 16,
         "seq_length": 2048, "use_dynamic_ntk": False},
    ],
)  # fmt: skip
def test_model_facts_agree_with_the_shards_config(tmp_path: Path, raw: dict) -> None:
    from worker.config import QwenConfig

    (tmp_path / "config.json").write_text(json.dumps(raw))
    facts, shard = read_model_facts(str(tmp_path)), QwenConfig.from_pretrained(str(tmp_path))
    assert (facts.seq_length, facts.use_dynamic_ntk) == (shard.seq_length, shard.use_dynamic_ntk)


def test_model_facts_name_a_missing_seq_length(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="seq_length"):
        read_model_facts(str(tmp_path))
    with pytest.raises(ValueError, match="config.json"):
        read_model_facts(os.path.join(str(tmp_path), "nowhere"))


def test_random_admissions_keep_every_block_accounted_for() -> None:
    """Hundreds of random requests over a few shared prefixes, adapters and alphas, some never computed,
    against brute-force recounts: every block is free, cached or one request's own, exactly once; counts of
    unreferenced blocks and eviction candidates match; a parent has at least its children's references."""
    import random

    rng = random.Random(1)
    kv = kv_blocks(n_blocks=41)
    prefixes = [toks(24, 1000 * k) for k in range(4)]
    live: list[Pending] = []
    for rid in range(600):
        if live and (rng.random() < 0.45 or kv.free_count < 8):
            p = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.8:
                kv.computed(p)  # else its Prefill failed or it was cancelled before its first token
            kv.give_back(p)
        else:
            prompt = rng.choice(prefixes)[: rng.randrange(4, 25)] + toks(rng.randrange(0, 9), 5000 + rid)
            key = (rng.randrange(2), rng.choice([1.0, 3.0]))
            p = pending(prompt, max_new=rng.randrange(1, 6), rid=rid)
            if kv.take(p, key):
                live.append(p)
        if rid % 97 == 0:
            kv.clear_cache()
        nodes = list(kv.prefix._nodes)  # type: ignore[union-attr]
        private = [b for p in live for b in p.blocks[len(p.nodes) :]]
        owned = [n.block for n in nodes] + private + list(kv.allocator._free)
        assert sorted(owned) == list(range(1, 41))  # each usable block exactly once
        assert kv.evictable_count == sum(n.refs == 0 for n in nodes)
        assert kv.prefix._leaves == {n for n in nodes if n.refs == 0 and not n.children}  # type: ignore[union-attr]
        assert all(n.parent is None or n.parent.refs >= n.refs for n in nodes if n.parent and n.parent.parent)
        assert sum(n.refs for n in nodes) == sum(len(p.nodes) for p in live)
    for p in live:
        kv.give_back(p)
    kv.clear_cache()
    assert kv.allocator.free_count == kv.capacity and kv.cached_count == 0
    assert kv.stats.hits > 50 and kv.stats.evicted_blocks > 20  # the cache was used, and under pressure
