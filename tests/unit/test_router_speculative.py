"""Speculative decoding through the router, against fake shards that accept several tokens per Decode
(test_router_fakes.py: Info.speculate = S, 1..S+1 tokens per Generation, stops checked token by token).
Expectations come from what the fake put on the wire (`FakeShard.sent`), never from the router."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from test_router import CONFIG, CharTokenizer, wait_until
from test_router_chunked import BUDGET, LONG, connect, serve_chunked
from test_router_fakes import FakeShard, serve_fakes, token_for

from router_client.blocks import blocks_needed
from router_client.messages import RouterConfig
from router_client.router import Router

S = 3  # drafts per step


@pytest.fixture
def spec() -> Iterator[tuple[Router, FakeShard]]:
    with serve_fakes(world=1, total_tokens=256, speculate=S) as (prefix, (shard,)):
        with Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=CONFIG) as router:
            yield router, shard


def steps_of(shard: FakeShard, request_id: int) -> list[list[int]]:
    return [ids for rid, ids in shard.sent if rid == request_id]


def test_every_accepted_token_is_one_event_in_order(spec) -> None:
    router, shard = spec
    handle = router.submit("abcd", stopping={"max_new_tokens": 12})
    events = list(handle.stream(timeout=10))
    res = handle.result(timeout=10)
    steps = steps_of(shard, handle.request_id)
    assert max(len(s) for s in steps) > 1  # the fake did send multi-token steps
    sent = [t for s in steps for t in s]
    assert sent == [token_for(handle.request_id, k) for k in range(12)]
    assert [e.id for e in events] == sent == res.token_ids
    assert [e.text for e in events] == [f"<{t}>" for t in sent]
    assert [e.last for e in events] == [False] * 11 + [True]
    assert res.generated_tokens == 12 and res.finish_reason == "length"
    assert res.skipped_tokens == sum(len(s) - 1 for s in steps) > 0


def test_kv_budget_covers_the_drafts(spec) -> None:
    router, shard = spec
    router.generate("abcde", timeout=10, stopping={"max_new_tokens": 7})
    prefill = shard.of("Prefill")[-1]
    assert len(prefill["slots"][0]) == 5 + 7 - 1 + S  # prompt, every token but the last, the drafts
    assert len(prefill["blocks"][0]) == blocks_needed(5, 7, shard.block_size, S)
    assert len(set(prefill["slots"][0])) == len(prefill["slots"][0])
    assert router.debug_state()["used_blocks"] == 0


def test_a_stop_inside_a_step_ends_the_stream_there(spec) -> None:
    """Request 0's steps are [0], [1, 2], [3, 4, 5], ...: a stop on token 4 drops token 5 of that step."""
    router, shard = spec
    keep = router.submit("abcd", stopping={"max_new_tokens": 30, "stop": ["<4>"]})
    other = router.submit("efgh", stopping={"max_new_tokens": 9})
    events = list(keep.stream(timeout=10))
    res = keep.result(timeout=10)
    assert keep.request_id == 0 and steps_of(shard, 0)[2] == [3, 4]  # cut inside the step
    assert [e.id for e in events] == [0, 1, 2, 3, 4] == res.token_ids
    assert events[-1].last and res.finish_reason == "stop_sequence" and res.generated_tokens == 5
    assert res.skipped_tokens == 2
    assert other.result(timeout=10).token_ids == [token_for(other.request_id, k) for k in range(9)]
    filtered = shard.of("FilterBatch")
    assert filtered and filtered[0]["request_ids"] == [other.request_id]
    assert router.debug_state()["used_blocks"] == 0


def test_accepted_tokens_per_decode_step_are_counted(spec) -> None:
    router, shard = spec
    handles = [router.submit(p, stopping={"max_new_tokens": n}) for p, n in (("ab", 10), ("cd", 7), ("ef", 1))]
    for h in handles:
        h.result(timeout=10)
    decode_steps = [s for h in handles for s in steps_of(shard, h.request_id)[1:]]  # after each first token
    stats, load = router.stats, router.load()
    assert stats.decode_rows == len(decode_steps) == load.decode_rows
    assert stats.decode_tokens == sum(len(s) for s in decode_steps) == load.decode_tokens == 9 + 6
    assert stats.accepted_per_step == pytest.approx(15 / len(decode_steps)) and stats.accepted_per_step > 1
    assert stats.tokens_generated == 18 and load.speculate == S


def test_without_speculation_every_decode_step_accepts_one_token() -> None:
    with serve_fakes(world=1) as (prefix, (shard,)):
        with Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=CONFIG) as router:
            res = router.generate("ab", timeout=10, stopping={"max_new_tokens": 6})
            assert res.skipped_tokens == 0
            assert (router.stats.decode_rows, router.stats.decode_tokens) == (5, 5)
            assert router.stats.accepted_per_step == 1.0 and router.load().speculate == 0


def test_prefix_cache_works_with_multi_token_steps() -> None:
    config = RouterConfig(**{**CONFIG.__dict__, "seq_length": 64})
    with serve_fakes(world=1, total_tokens=256, speculate=S) as (prefix, (shard,)):
        with Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=config) as router:
            first = router.generate("abcdefghijkl", timeout=10, stopping={"max_new_tokens": 9})
            second = router.generate("abcdefghijkl", timeout=10, stopping={"max_new_tokens": 9})
            assert first.token_ids == [token_for(0, k) for k in range(9)]
            assert second.token_ids == [token_for(1, k) for k in range(9)]
            load = router.load()
            assert load.prefix_hit_tokens == 8  # two of the three full blocks (the last is computed again)
            assert load.prefix_cached_blocks == 3 and load.blocks_used == 0


def test_acceptance_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    config = RouterConfig(**{**CONFIG.__dict__, "prefix_log_interval_s": 1e-9})
    with serve_fakes(world=1, total_tokens=256, speculate=S) as (prefix, (shard,)):
        with Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=config) as router:
            with caplog.at_level(logging.INFO, logger="router_client.speculation"):
                router.generate("ab", timeout=10, stopping={"max_new_tokens": 10})
                router.generate("cd", timeout=10, stopping={"max_new_tokens": 2})  # a step after the first ends
            rows = [s for rid, s in shard.sent if rid == 0][1:]
    lines = [r.getMessage() for r in caplog.records if r.name == "router_client.speculation"]
    mean = sum(len(s) for s in rows) / len(rows)
    assert any(line.startswith(f"speculative decoding (3 drafts per step): {mean:.2f} accepted") for line in lines)


def test_chunked_admission_leaves_room_for_the_verify_rows() -> None:
    """With chunked prefill a step runs the running batch's verify rows (1 + S tokens each, the shard's
    current_tokens) beside new prompt chunks; the router's budget covers both, and a request whose prompt took
    several steps has its first token counted as no Decode row."""
    with serve_chunked(speculate=S) as (prefix, shard), connect(prefix) as router:
        running = router.submit("abcd", stopping={"max_new_tokens": 30})
        wait_until(lambda: shard.forwards and shard.forwards[-1].decoded)
        long = router.submit(LONG, stopping={"max_new_tokens": 5})
        assert long.result(timeout=10).token_ids == [token_for(long.request_id, k) for k in range(5)]
        assert running.result(timeout=10).token_ids == [token_for(running.request_id, k) for k in range(30)]
        chunked = [f for f in shard.forwards if f.chunks.get(long.request_id) and f.decoded]
        assert len([f for f in shard.forwards if long.request_id in f.chunks]) > 1 and chunked
        assert max(f.tokens for f in shard.forwards) <= BUDGET
        rows = [ids for rid, ids in shard.sent if rid in (running.request_id, long.request_id)]
        assert router.stats.decode_rows == len(rows) - 2  # each request's first Generation is no Decode row
