"""The fed look-ahead in a real shard process (`--look-ahead on --look-ahead-fed on`, CPU: the eager launch), driven
the way LoRAX's router does: requests hold router blocks out of order with exactly prompt + max_new_tokens - 1
slots (a request's last step feeds a row past its slots), finish at different steps and are filtered out, and a
new batch takes the freed blocks and joins the running one in a Decode. Every greedy token is the float64
reference's."""

from __future__ import annotations

import os

from helpers import chunk_request
from make_demo_model import BASE_TEXTS
from reference import ref_greedy
from shards import start_launcher, stop

BS = 16


def _request(rid: int, ids: list[int], max_new: int, blocks: list[int]):
    n = len(ids) + max_new - 1
    blocks = blocks[: -(-n // BS)]
    slots = [b * BS + j for b in blocks for j in range(BS)][:n]
    assert len(slots) == n
    return chunk_request(rid, ids, max_new, blocks=blocks, slots=slots)


def test_fed_look_ahead_shard_serves_the_reference_tokens(demo_dir, tok, ref_model):
    from worker.pb import generate_pb2 as pb

    prompts = {1: (BASE_TEXTS[0][0], 5), 2: (BASE_TEXTS[2][0], 12), 3: (BASE_TEXTS[4][0], 9)}
    later = {4: (BASE_TEXTS[1][0], 6), 5: (BASE_TEXTS[3][0], 4)}
    state, cfg = ref_model
    want = {rid: ref_greedy(state, cfg, tok.encode(p), n) for rid, (p, n) in {**prompts, **later}.items()}
    free = [7, 2, 11, 4, 19, 17, 30, 21, 25, 33, 9, 40, 12, 36, 5, 28, 14, 23]
    owner: dict[int, list[int]] = {}
    got: dict[int, list[int]] = {rid: [] for rid in want}
    done: set[int] = set()

    def build(batch_id: int, reqs: dict[int, tuple[str, int]]):
        out = []
        for rid, (p, n) in reqs.items():
            ids = tok.encode(p)
            need = -(-(len(ids) + n - 1) // BS)
            owner[rid], free[:] = free[:need], free[need:]
            out.append(_request(rid, ids, n, owner[rid]))
        return pb.Batch(id=batch_id, requests=out, size=len(out))

    def take(resp):
        for g in resp.generations:
            got[g.request_id] += list(g.next_tokens.ids)
            if g.HasField("generated_text"):
                done.add(g.request_id)
                free[:0] = owner.pop(g.request_id)  # the router frees the blocks and hands them out first
        if not resp.HasField("batch"):
            return None
        keep = [i for i in resp.batch.request_ids if i not in done]
        if len(keep) == len(resp.batch.request_ids):
            return resp.batch
        return stub.FilterBatch(pb.FilterBatchRequest(batch_id=resp.batch.id, request_ids=keep)).batch

    fed = ("--look-ahead", "on", "--look-ahead-fed", "on")
    shard = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), extra=fed)
    try:
        stub = shard.stub(0)
        warm = pb.Batch(id=0, requests=[_request(0, tok.encode("warm up"), 4, [0, 1])])
        stub.Warmup(pb.WarmupRequest(batch=warm, max_input_length=64, max_prefill_tokens=256, max_new_tokens=16))
        batch = take(stub.Prefill(pb.PrefillRequest(batch=build(1, prompts))))
        while 1 not in done:
            batch = take(stub.Decode(pb.DecodeRequest(batches=[batch])))
        freed = set(free[:2])
        new = take(stub.Prefill(pb.PrefillRequest(batch=build(2, later))))
        assert freed <= set(owner[4])  # request 1's blocks, written by its last fed row, now request 4's
        batch = take(stub.Decode(pb.DecodeRequest(batches=[batch, new])))
        while batch is not None:
            batch = take(stub.Decode(pb.DecodeRequest(batches=[batch])))
    finally:
        rc = stop(shard)
    assert rc == 0, shard.log()[-3000:]
    assert got == want and done == set(want)
