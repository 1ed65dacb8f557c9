"""The router: block allocator, slot layout, and the LoRAX serving loop against fake shards on
real unix sockets (see test_router_fakes.py for the fake's generation rule)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_router_fakes import serve_fakes, token_for

from router_client.blocks import BlockAllocator, blocks_needed, slots_for, tokens_needed
from router_client.messages import RouterConfig
from router_client.requests import RequestError, ValidationError
from router_client.router import Router

U64_MAX = 2**64 - 1
CONFIG = RouterConfig(
    max_input_length=16,
    max_total_tokens=48,
    max_batch_prefill_tokens=32,
    max_batch_size=8,
    call_timeout_s=10,
    connect_timeout_s=10,
)


class CharTokenizer:
    """One token per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]


def wait_until(cond: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.002)
    raise AssertionError("condition not reached in time")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every router loop, fan-out pool and fake server thread is gone after each test."""
    yield
    ours = ("qwen-router-loop", "shard-call", "fake-shard")
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith(ours)], timeout=5)


@pytest.fixture
def fake() -> Iterator[tuple[str, list]]:
    with serve_fakes(world=1) as served:
        yield served


@pytest.fixture
def router(fake: tuple[str, list]) -> Iterator[Router]:
    prefix, _ = fake
    with Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=CONFIG) as r:
        yield r


# ---------------------------------------------------------------------- blocks and slots


def test_block_allocator_reserves_block_0_and_is_all_or_nothing() -> None:
    alloc = BlockAllocator(num_blocks=5, block_size=4)
    assert alloc.capacity == alloc.free_count == 4
    got = alloc.allocate(3)
    assert got is not None and 0 not in got and len(set(got)) == 3
    assert alloc.allocate(2) is None and alloc.free_count == 1  # nothing taken on failure
    last = alloc.allocate(1)
    assert last is not None and 0 not in last and alloc.free_count == 0
    alloc.free(got)
    alloc.free(last)
    for _ in range(10):  # churn: block 0 never comes out
        blocks = alloc.allocate(4)
        assert blocks is not None and sorted(blocks) == [1, 2, 3, 4]
        alloc.free(blocks)
    assert alloc.allocate(0) == []


def test_block_allocator_rejects_bad_frees() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    blocks = alloc.allocate(2)
    assert blocks is not None
    alloc.free(blocks[:1])
    with pytest.raises(ValueError, match="double free"):
        alloc.free(blocks[:1])
    with pytest.raises(ValueError):
        alloc.free([0])  # reserved
    with pytest.raises(ValueError):
        alloc.free([99])
    with pytest.raises(ValueError):
        alloc.free([blocks[1], blocks[1]])
    assert alloc.free_count == 2  # the failed frees changed nothing
    with pytest.raises(ValueError):
        BlockAllocator(num_blocks=1, block_size=4)  # nothing left after the reserved block


def test_slot_layout() -> None:
    assert tokens_needed(5, 4) == 8
    assert blocks_needed(5, 4, block_size=4) == 2  # 8 tokens
    assert blocks_needed(5, 5, block_size=4) == 3  # 9 tokens
    assert blocks_needed(5, 4, block_size=4, speculate=1) == 3
    assert slots_for([3, 7], block_size=4, n_tokens=6) == [12, 13, 14, 15, 28, 29]
    assert slots_for([2], block_size=4, n_tokens=4) == [8, 9, 10, 11]
    with pytest.raises(ValueError):
        slots_for([1], block_size=4, n_tokens=5)
    with pytest.raises(ValueError):
        tokens_needed(0, 4)


# ---------------------------------------------------------------------- startup and one request


def test_startup_sequence(fake: tuple[str, list], router: Router) -> None:
    shard = fake[1][0]
    assert shard.names()[:4] == ["ServiceDiscovery", "ClearCache", "Info", "Warmup"]
    assert shard.calls[1][1] == {"id": None}
    warmup = shard.of("Warmup")[0]
    assert warmup["max_input_length"] == 16 and warmup["max_prefill_tokens"] == 32
    assert warmup["max_new_tokens"] == 48 - 16
    requests = warmup["requests"]
    assert len(requests) == 2  # 32 prefill tokens / 16 per request
    for req in requests:
        assert req.inputs and not req.tokenized_inputs.ids and not req.blocks and not req.slots
        assert req.truncate == 16
    state = router.debug_state()
    assert state["block_size"] == 4 and state["usable_blocks"] == 64 // 4 - 1 == state["free_blocks"]


def test_one_request_tokens_blocks_and_slots(fake: tuple[str, list], router: Router) -> None:
    shard = fake[1][0]
    handle = router.submit("hello", stopping={"max_new_tokens": 6})
    events = list(handle.stream())
    result = handle.result(timeout=5)
    assert handle.request_id == 0
    assert result.token_ids == [token_for(0, s) for s in range(6)] == [e.id for e in events]
    assert result.finish_reason == "length" and result.generated_tokens == 6
    assert "".join(e.text for e in events) == result.text
    prefill = shard.of("Prefill")[0]
    assert prefill["ids"] == [CharTokenizer().encode("hello")] and not prefill["cached"]
    blocks, slots = prefill["blocks"][0], prefill["slots"][0]
    assert len(blocks) == blocks_needed(5, 6, 4) == 3 and 0 not in blocks
    assert slots == slots_for(blocks, 4, 5 + 6 - 1)
    # the fake answers no batch once all finished: no FilterBatch/ClearCache needed
    assert shard.names()[4:] == ["Prefill"] + ["Decode"] * 5
    state = router.debug_state()
    assert state["free_blocks"] == state["usable_blocks"] and not state["in_flight"]
    assert router.stats.tokens_generated == 6 and router.stats.steps == 6


def test_clear_cache_when_the_batch_comes_back_all_finished(fake: tuple[str, list], router: Router) -> None:
    shard = fake[1][0]
    shard.return_finished_batch = True
    router.generate([5, 6, 7], timeout=5, stopping={"max_new_tokens": 3})
    assert shard.names()[4:] == ["Prefill", "Decode", "Decode", "ClearCache"]
    assert shard.calls[-1][1] == {"id": 0}
    assert router.debug_state()["free_blocks"] == router.debug_state()["usable_blocks"]


# ---------------------------------------------------------------------- continuous batching


def test_continuous_batching_merges_then_filters_in_order(fake: tuple[str, list], router: Router) -> None:
    shard = fake[1][0]
    shard.decode_gate.clear()
    a = router.submit("aaaa", stopping={"max_new_tokens": 8})
    wait_until(lambda: shard.of("Decode"))  # A's first Decode is in flight, held by the gate
    b = router.submit("bbbb", stopping={"max_new_tokens": 8})
    c = router.submit("cccc", stopping={"max_new_tokens": 2})
    d = router.submit("dddd", stopping={"max_new_tokens": 8})
    assert router.debug_state()["queued"] == [1, 2, 3]
    shard.decode_gate.set()
    results = [h.result(timeout=5) for h in (a, b, c, d)]
    for h, res, n in zip((a, b, c, d), results, (8, 8, 2, 8)):
        assert res.token_ids == [token_for(h.request_id, s) for s in range(n)]
    names = shard.names()
    second_prefill = names.index("Prefill", names.index("Prefill") + 1)
    assert shard.calls[second_prefill][1]["batch_id"] == 1
    assert shard.calls[second_prefill][1]["request_ids"] == [1, 2, 3]
    assert shard.calls[second_prefill + 1] == ("Decode", {"batch_ids": [0, 1], "request_ids": [[0], [1, 2, 3]]})
    # C finished on that merged step: the router keeps the others, in batch order
    assert shard.calls[second_prefill + 2] == ("FilterBatch", {"batch_id": 0, "request_ids": [0, 1, 3]})
    later_decodes = shard.of("Decode")[2:]
    assert all(f["batch_ids"] == [0] for f in later_decodes)
    used = [blk for f in shard.of("Prefill") for blocks in f["blocks"] for blk in blocks]
    assert 0 not in used and len(used) == len(set(used))  # no block shared by two live requests
    state = router.debug_state()
    assert state["free_blocks"] == state["usable_blocks"] and state["running_batch"] is None


def test_admission_waits_for_free_blocks() -> None:
    # 32 KV tokens -> 8 blocks, 7 usable; each request needs ceil((4 + 12 - 1) / 4) = 4 blocks
    with serve_fakes(world=1, total_tokens=32) as (prefix, (shard,)):
        with Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=CONFIG) as router:
            shard.decode_gate.clear()
            first = router.submit("abcd", stopping={"max_new_tokens": 12})
            wait_until(lambda: shard.of("Decode"))
            second = router.submit("efgh", stopping={"max_new_tokens": 12})
            shard.decode_gate.set()
            first.result(timeout=5), second.result(timeout=5)
            assert all(len(f["batch_ids"]) == 1 for f in shard.of("Decode"))  # never ran together
            prefills = [i for i, name in enumerate(shard.names()) if name == "Prefill"]
            decodes_of_0 = [i for i, (n, f) in enumerate(shard.calls) if n == "Decode" and f["batch_ids"] == [0]]
            assert prefills[1] > decodes_of_0[-1]  # admitted only once the first freed its blocks
            with pytest.raises(ValidationError, match="can never run"):
                router.submit("0123456789", stopping={"max_new_tokens": 30})  # 39 tokens > 28 in the pool


def test_validation_errors(router: Router) -> None:
    with pytest.raises(ValidationError, match="empty"):
        router.submit("")
    with pytest.raises(ValidationError, match="max_input_length"):
        router.submit("x" * 17)
    with pytest.raises(ValidationError, match="unknown sampling"):
        router.submit("hi", parameters={"temprature": 0.5})
    with pytest.raises(ValidationError, match="max_new_tokens"):
        router.submit("hi", stopping={"max_new_tokens": 0})
    with pytest.raises(ValidationError, match="adapter index 3"):
        router.submit("hi", adapter_index=3)
    assert router.submit("x" * 20, truncate=16, stopping={"max_new_tokens": 1}).result(5).generated_tokens == 1


# ---------------------------------------------------------------------- health, failures, adapters


def test_health_probe_shape(fake: tuple[str, list], router: Router) -> None:
    shard = fake[1][0]
    assert router.health_probe() is True
    probe = shard.of("Prefill")[-1]
    assert probe["batch_id"] == U64_MAX and probe["request_ids"] == [U64_MAX]
    assert probe["blocks"] == [[0]] and probe["slots"] == [[0]]
    assert probe["max_new_tokens"] == [1] and len(probe["ids"][0]) == 1
    assert shard.calls[-1] == ("ClearCache", {"id": U64_MAX})
    assert router.debug_state()["free_blocks"] == router.debug_state()["usable_blocks"]


def test_failed_prefill_fails_only_that_request(fake: tuple[str, list], router: Router) -> None:
    shard = fake[1][0]
    shard.decode_gate.clear()
    running = router.submit("keep going", stopping={"max_new_tokens": 6})
    wait_until(lambda: shard.of("Decode"))
    bad = router.submit("fail me", stopping={"max_new_tokens": 4})
    shard.decode_gate.set()
    with pytest.raises(RequestError, match="boom on shard 0"):
        bad.result(timeout=5)
    with pytest.raises(RequestError, match="INVALID_ARGUMENT"):
        list(bad.stream())
    assert running.result(timeout=5).token_ids == [token_for(running.request_id, s) for s in range(6)]
    assert ("ClearCache", {"id": 1}) in shard.calls  # the failed batch is dropped on the shard
    after = router.generate("next one", timeout=5, stopping={"max_new_tokens": 3})
    assert after.generated_tokens == 3
    state = router.debug_state()
    assert state["free_blocks"] == state["usable_blocks"]
    assert router.stats.requests_failed == 1 and router.stats.requests_finished == 2


def test_adapters_load_use_offload(fake: tuple[str, list], router: Router) -> None:
    shard = fake[1][0]
    assert router.load_adapter("a1") == 1
    assert router.load_adapter(["a2", "a3"]) == 2
    assert shard.of("DownloadAdapter")[0]["ids"] == ["a1"]
    assert [f["index"] for f in shard.of("LoadAdapter")] == [1, 2]
    router.generate("hi", timeout=5, adapter_index=1, stopping={"max_new_tokens": 2})
    assert shard.of("Prefill")[-1]["adapter_index"] == [1]
    router.offload_adapter(1)
    assert shard.of("OffloadAdapter") == [{"ids": ["a1"], "index": 1}]
    # an offloaded adapter is loaded back (same index) when a request for it is admitted
    router.generate("hi", timeout=5, adapter_index=1, stopping={"max_new_tokens": 2})
    assert [f["index"] for f in shard.of("LoadAdapter")] == [1, 2, 1]
    with pytest.raises(ValidationError, match="not loaded"):
        router.submit("hi", adapter_index=99)  # never loaded
    assert router.load_adapter("a1") == 3  # indices are never reused


def test_adapter_budget_offloads_idle_lru(fake: tuple[str, list], router: Router) -> None:
    """Each fake adapter takes 0.25 of the budget: the fifth load offloads the least recently used
    idle one; an adapter in use is never offloaded."""
    shard = fake[1][0]
    for k in range(4):
        assert router.load_adapter(f"b{k}") == k + 1
    router.generate("hi", timeout=5, adapter_index=1, stopping={"max_new_tokens": 1})  # 1 is now the most recent
    assert router.load_adapter("b4") == 5
    assert [f["index"] for f in shard.of("OffloadAdapter")] == [2]  # LRU idle: loaded but never used
    assert sum(a["loaded"] for a in router.debug_state()["adapters"].values()) == 4


def test_close_fails_waiting_and_running_requests(fake: tuple[str, list]) -> None:
    prefix, (shard,) = fake
    router = Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=CONFIG)
    shard.decode_gate.clear()
    running = router.submit("abc", stopping={"max_new_tokens": 20})
    wait_until(lambda: shard.of("Decode"))
    threading.Timer(0.05, shard.decode_gate.set).start()
    router.close()
    with pytest.raises(RequestError, match="closed"):
        running.result(timeout=5)
    assert ("ClearCache", {"id": 0}) in shard.calls
    with pytest.raises(RequestError, match="not running"):
        router.submit("abc")
