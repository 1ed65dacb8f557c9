"""Speculative decoding at the gRPC contract: real shards on real sockets, driven the way LoRAX's router does.

A shard drafting by prompt lookup (--speculative-tokens 4) reports Info.speculate = 4; requests get router blocks
out of order holding prompt + max_new_tokens + S - 1 slots (the router's budget with speculation); Generations
carry several tokens with ids, logprobs, texts and is_special of equal length; GeneratedText.skipped_tokens
counts the tokens after the first of each step; the greedy tokens are the float64 reference's. A shard with the
demo's Medusa heads (3) and --speculative-tokens 2 reports Info.speculate = 2 and the same tokens.
"""

from __future__ import annotations

import os

import pytest

from helpers import chunk_request
from make_demo_model import BASE_TEXTS
from reference import ref_greedy
from shards import start_launcher, stop

BS = 16
COPY = BASE_TEXTS[0][0] + BASE_TEXTS[0][1] + " " + BASE_TEXTS[0][0]  # the answer repeats the prompt's words
PROMPTS = [COPY, BASE_TEXTS[2][0], BASE_TEXTS[4][0]]
MAX_NEW = 24


def request(rid: int, ids: list[int], blocks: list[int], speculate: int):
    """A greedy request holding the router's slots for it: prompt + max_new_tokens + S - 1, in `blocks` order."""
    n = len(ids) + MAX_NEW + speculate - 1
    blocks = blocks[: -(-n // BS)]  # the router's blocks_needed, from the given (scattered) ones
    slots = [b * BS + j for b in blocks for j in range(BS)][:n]
    assert len(slots) == n
    return chunk_request(rid, ids, MAX_NEW, blocks=blocks, slots=slots)


def generate(shard, tok) -> tuple[int, dict[int, list[list[int]]], dict]:
    """Info.speculate, each request's tokens per Generation, and its GeneratedText."""
    from worker.pb import generate_pb2 as pb

    stub = shard.stub(0)
    info = stub.Info(pb.InfoRequest())
    S = info.speculate
    warm = pb.Batch(id=0, requests=[request(0, tok.encode("warm up"), [0, 1, 2, 3], S)])
    stub.Warmup(pb.WarmupRequest(batch=warm, max_input_length=64, max_prefill_tokens=256, max_new_tokens=MAX_NEW))
    block_sets = [[7, 2, 11, 4, 19, 17], [30, 21, 25, 33], [9, 40, 12, 36]]  # out of order, never contiguous
    reqs = [request(i + 1, tok.encode(p), b, S) for i, (p, b) in enumerate(zip(PROMPTS, block_sets))]
    steps: dict[int, list[list[int]]] = {r.id: [] for r in reqs}
    done = {}
    resp = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=reqs, size=len(reqs))))
    while True:
        for g in resp.generations:
            t = g.next_tokens
            assert len(t.ids) == len(t.logprobs) == len(t.texts) == len(t.is_special) >= 1
            assert "".join(t.texts) == tok.decode(list(t.ids)) or len(t.ids) == 1  # incremental texts, in order
            steps[g.request_id].append(list(t.ids))
            if g.HasField("generated_text"):
                done[g.request_id] = g.generated_text
        if not resp.HasField("batch"):
            return S, steps, done
        batch = resp.batch
        if any(g.HasField("generated_text") for g in resp.generations):
            keep = [i for i in batch.request_ids if i not in done]
            batch = stub.FilterBatch(pb.FilterBatchRequest(batch_id=batch.id, request_ids=keep)).batch
        resp = stub.Decode(pb.DecodeRequest(batches=[batch]))


@pytest.fixture(scope="module")
def expected(ref_model, tok) -> dict[int, list[int]]:
    state, cfg = ref_model
    return {i + 1: ref_greedy(state, cfg, tok.encode(p), MAX_NEW) for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize(
    "extra,speculate",
    [(("--speculative-tokens", "4"), 4), (("--speculative-adapter", "medusa", "--speculative-tokens", "2"), 2)],
    ids=["prompt-lookup", "medusa"],
)
def test_speculating_shard_serves_the_reference_tokens(demo_dir, tok, expected, extra, speculate):
    shard = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), extra=extra)
    try:
        S, steps, done = generate(shard, tok)
    finally:
        rc = stop(shard)
    assert rc == 0, shard.log()[-3000:]
    assert S == speculate
    for rid, want in expected.items():
        assert [t for s in steps[rid] for t in s] == want
        assert done[rid].generated_tokens == MAX_NEW and done[rid].skipped_tokens == sum(len(s) - 1 for s in steps[rid])
        assert max(len(s) for s in steps[rid]) <= S + 1
    assert max(len(s) for s in steps[1]) == S + 1 and done[1].skipped_tokens >= 5  # the copy prompt's drafts
