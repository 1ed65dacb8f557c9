"""Chunked prefill over gRPC, driven call by call the way LoRAX's router drives it, against real shard
processes on their unix sockets (demo model; one shard, and two over gloo).

The sequence: Prefill of a batch whose last request the router cut to its budget (chunk_len); a Decode on
the partially prefilled batch; Prefill of a new chunked request with the running batch as cached_batch (one
forward); FilterBatch of that request mid-chunk (cancelled); Decode to the end. Claims: every greedy token
equals the float64 reference's on the whole prompt (prompts past seq_length: NTK and logn active), a request
gets no Generation until its last chunk, current_tokens is the next forward's tokens, Info says
chunked_prefill, and afterwards no batch is live and every shard-owned KV block is free on every rank.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import chunk_request
from reference import load_checkpoint, ref_greedy
from shards import start_launcher, stop

BUDGET = 64  # the router's max_batch_prefill_tokens (Warmup's max_prefill_tokens)
SHORT = [11, 12, 13, 14]
LONG = random.Random(1).choices(range(300), k=290)  # > seq_length 256: NTK alpha 3, logn active
OTHER = random.Random(2).choices(range(300), k=270)


def pbm():
    from worker.pb import generate_pb2 as pb

    return pb


class Shards:
    """Each call goes to every rank at once (the ranks run one forward together); a step's generations are
    merged (each rank reports its own requests)."""

    def __init__(self, proc, world: int):
        self.stubs = [proc.stub(r) for r in range(world)]
        self.pool = ThreadPoolExecutor(world)

    def call(self, method: str, request):
        answers = list(self.pool.map(lambda s: getattr(s, method)(request, timeout=120), self.stubs))
        if method in ("Prefill", "Decode"):
            first = answers[0]
            for other in answers[1:]:
                first.generations.extend(other.generations)
                assert other.batch == first.batch
        return answers[0]

    def stats(self) -> list[dict]:
        pb = pbm()
        out = []
        for s in self.stubs:
            _, call = s.Health.with_call(pb.HealthRequest())
            out.append(json.loads(dict(call.trailing_metadata())["x-qwen-worker-stats"]))
        return out


@pytest.fixture(scope="module")
def ref(demo_dir):
    state, cfg = load_checkpoint(os.path.join(demo_dir, "model"))
    return {1: ref_greedy(state, cfg, SHORT, 30), 2: ref_greedy(state, cfg, LONG, 3)}


@pytest.mark.parametrize("world", [1, 2])
def test_a_lorax_router_sequence_with_chunks(demo_dir, ref, world):
    model, adapters = os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters")
    # requests come without blocks: the shard's own allocator (1/64 of the cache) serves them, and is checked
    proc = start_launcher(model, adapters, num_shard=world, extra=("--max-total-tokens", "65536"))
    try:
        _sequence(Shards(proc, world), ref)
    finally:
        assert stop(proc) == 0, proc.log()[-3000:]


def _sequence(shards: Shards, ref: dict[int, list[int]]) -> None:
    pb = pbm()
    assert shards.call("Info", pb.InfoRequest()).chunked_prefill
    warm = pb.Batch(id=0, requests=[chunk_request(0, SHORT, 2)], size=1)
    shards.call("Warmup", pb.WarmupRequest(batch=warm, max_input_length=512, max_prefill_tokens=BUDGET))
    free = [s["shard_blocks_free"] for s in shards.stats()]
    got: dict[int, list[int]] = {1: [], 2: []}
    currents = []

    def step(resp):
        for g in resp.generations:
            if g.request_id == 2:  # the prompt's length comes with the first token
                assert g.prefill_tokens_length == (0 if got[2] else len(LONG))
            got.setdefault(g.request_id, []).extend(g.next_tokens.ids)
        currents.append(resp.batch.current_tokens if resp.HasField("batch") else 0)
        return resp.batch

    # the router cut LONG to what its budget left after SHORT: 4 + 60 tokens
    first = pb.Batch(
        id=1, requests=[chunk_request(1, SHORT, 30), chunk_request(2, LONG, 3, chunk=BUDGET - len(SHORT))], size=2
    )
    batch = step(shards.call("Prefill", pb.PrefillRequest(batch=first)))
    assert got == {1: ref[1][:1], 2: []} and currents[-1] == 1 + (BUDGET - 1)  # SHORT decodes, LONG's next chunk
    batch = step(shards.call("Decode", pb.DecodeRequest(batches=[batch])))  # LONG: [60, 123)
    assert not got[2] and currents[-1] == BUDGET
    new = pb.Batch(id=2, requests=[chunk_request(3, OTHER, 3, chunk=10)], size=1)  # a router with a little more budget
    batch = step(shards.call("Prefill", pb.PrefillRequest(batch=new, cached_batch=batch)))  # one forward
    assert batch.id == 1 and list(batch.request_ids) == [1, 2, 3] and len(got[1]) == 3 and not got[2]
    assert 3 not in got and currents[-1] == 1 + 62 + 1  # the budget less SHORT's row, shared in batch order
    batch = shards.call("FilterBatch", pb.FilterBatchRequest(batch_id=1, request_ids=[1, 2])).batch  # cancelled
    assert list(batch.request_ids) == [1, 2] and batch.current_tokens == 1 + 62
    while batch is not None and batch.request_ids:
        resp = shards.call("Decode", pb.DecodeRequest(batches=[batch]))
        batch = step(resp)
        done = {g.request_id for g in resp.generations if g.HasField("generated_text")}
        if done and resp.HasField("batch"):
            keep = [r for r in batch.request_ids if r not in done]
            batch = shards.call("FilterBatch", pb.FilterBatchRequest(batch_id=batch.id, request_ids=keep)).batch
        elif not resp.HasField("batch"):
            batch = None
    assert got[1] == ref[1] and got[2] == ref[2] and 3 not in got
    after = shards.stats()
    assert all(s["batches"] == 0 for s in after) and [s["shard_blocks_free"] for s in after] == free
