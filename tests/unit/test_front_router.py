"""What the HTTP front needs of the router, against fake shards on real unix sockets: cancellation
(queued and running; FilterBatch drops the request and its blocks come back), a refused request
failing alone when it shares a Prefill, adapter reuse by parameters, non-blocking event delivery
(`take` + `notify`), step records and the load snapshot."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from test_router import CONFIG, CharTokenizer, wait_until
from test_router_fakes import serve_fakes, token_for

from router_client.messages import StepRecord
from router_client.requests import CANCELLED, RequestError
from router_client.router import Router


@pytest.fixture
def fake() -> Iterator[tuple[str, list]]:
    with serve_fakes(world=1) as served:
        yield served


@pytest.fixture
def router(fake: tuple[str, list]) -> Iterator[Router]:
    with Router.connect(f"{fake[0]}-0", tokenizer=CharTokenizer(), config=CONFIG) as r:
        yield r


def test_cancel_running_request_is_filtered_out_and_frees_its_blocks(fake, router) -> None:
    shard = fake[1][0]
    shard.decode_gate.clear()
    keep = router.submit("keep", stopping={"max_new_tokens": 10})
    drop = router.submit("drop", stopping={"max_new_tokens": 10})
    wait_until(lambda: shard.of("Decode"))
    used_before = router.debug_state()["used_blocks"]
    router.cancel(drop.request_id)
    shard.decode_gate.set()
    with pytest.raises(RequestError, match="cancelled") as err:
        drop.result(timeout=5)
    assert err.value.code == CANCELLED
    assert keep.result(timeout=5).token_ids == [token_for(keep.request_id, s) for s in range(10)]
    filters = shard.of("FilterBatch")
    assert filters and filters[0]["request_ids"] == [keep.request_id]
    # the dropped request never reached another Decode after its FilterBatch
    first_filter = shard.names().index("FilterBatch")
    later = [f for n, f in shard.calls[first_filter:] if n == "Decode"]
    assert later and all(drop.request_id not in ids for f in later for ids in f["request_ids"])
    state = router.debug_state()
    assert used_before > 0 and state["used_blocks"] == 0 and state["in_flight"] == []
    assert router.stats.requests_failed == 1


def test_cancel_the_only_running_request_clears_its_batch(fake, router) -> None:
    shard = fake[1][0]
    shard.decode_gate.clear()
    handle = router.submit("solo", stopping={"max_new_tokens": 20})
    wait_until(lambda: shard.of("Decode"))
    router.cancel(handle.request_id)
    shard.decode_gate.set()
    with pytest.raises(RequestError, match="cancelled"):
        handle.result(timeout=5)
    wait_until(lambda: ("ClearCache", {"id": 0}) in shard.calls)
    assert len(shard.of("Decode")) < 19 and router.debug_state()["used_blocks"] == 0
    assert not shard.batches


def test_cancel_a_waiting_request_never_sends_it(fake, router) -> None:
    shard = fake[1][0]
    shard.decode_gate.clear()
    running = router.submit("abcd", stopping={"max_new_tokens": 4})
    wait_until(lambda: shard.of("Decode"))
    waiting = router.submit("efgh", stopping={"max_new_tokens": 4})
    router.cancel(waiting.request_id)
    with pytest.raises(RequestError, match="cancelled"):
        waiting.result(timeout=1)
    shard.decode_gate.set()
    running.result(timeout=5)
    sent = [rid for f in shard.of("Prefill") for rid in f["request_ids"]]
    assert waiting.request_id not in sent
    router.cancel(running.request_id)  # finished: nothing happens
    assert router.debug_state()["used_blocks"] == 0


def test_a_refused_request_in_a_shared_prefill_fails_alone(fake, router) -> None:
    shard = fake[1][0]
    shard.decode_gate.clear()
    first = router.submit("first", stopping={"max_new_tokens": 3})
    wait_until(lambda: shard.of("Decode"))
    good = router.submit("good", stopping={"max_new_tokens": 3})
    bad = router.submit("fail me", stopping={"max_new_tokens": 3})
    also_good = router.submit("fine", stopping={"max_new_tokens": 3})
    shard.decode_gate.set()
    with pytest.raises(RequestError, match="boom") as err:
        bad.result(timeout=5)
    assert err.value.code == "INVALID_ARGUMENT" and err.value.at_prefill
    for h in (first, good, also_good):
        assert h.result(timeout=5).generated_tokens == 3
    prefills = [f["request_ids"] for f in shard.of("Prefill")]
    assert [good.request_id, bad.request_id, also_good.request_id] in prefills  # tried together first
    assert [bad.request_id] in prefills and [good.request_id] in prefills  # then one by one
    assert router.debug_state()["used_blocks"] == 0 and not shard.batches


def test_load_adapter_reuse_keeps_one_index_per_parameters(fake, router) -> None:
    shard = fake[1][0]
    a = router.load_adapter("a1", reuse=True)
    assert router.load_adapter("a1", reuse=True) == a
    assert router.load_adapter(["a1", "a2"], reuse=True) != a  # a merge is another adapter
    router.offload_adapter(a)
    assert router.load_adapter("a1", reuse=True) == a  # offloaded: same index, loaded on admission
    assert len(shard.of("LoadAdapter")) == 2
    router.generate("hi", timeout=5, adapter_index=a, stopping={"max_new_tokens": 1})
    assert [f["index"] for f in shard.of("LoadAdapter")] == [a, a + 1, a]


def test_take_and_notify_deliver_events_without_blocking(router) -> None:
    handle = router.submit("hello", stopping={"max_new_tokens": 5})
    woken = threading.Event()
    handle.notify = woken.set
    events, done = [], False
    while not done:
        woken.wait(timeout=5)
        woken.clear()
        got, done = handle.take()
        events += got
    assert [e.id for e in events] == handle.result(timeout=1).token_ids == [token_for(0, s) for s in range(5)]
    assert handle.take() == ([], False)  # the end was already consumed


def test_step_observer_and_load(fake) -> None:
    records: list[StepRecord] = []
    router = Router.connect(f"{fake[0]}-0", tokenizer=CharTokenizer(), config=CONFIG)
    with router:
        router.step_observer = records.append
        router.generate("abc", timeout=5, stopping={"max_new_tokens": 3})
        load = router.load()
    assert [r.method for r in records] == ["prefill", "decode", "decode"]
    assert all(r.duration_s >= 0 and r.batch_size == 1 for r in records)
    assert (load.queued, load.in_flight, load.batch_size, load.blocks_used) == (0, 0, 0, 0)
    assert load.blocks_free == router.debug_state()["usable_blocks"]
