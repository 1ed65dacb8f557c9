"""Where a fed look-ahead writes K/V when a request stops at the token it is fed: only into blocks that request
owns or the scratch block. A router's prefix cache shares full prompt blocks between requests; the stopping
request's row (its position past its slots and its blocks) must leave such a block, and every block it does not
own, bit for bit as it was: the router may hand them out, or share them, at once."""

from __future__ import annotations

import os

import torch

from helpers import chunk_request
from look_ahead_script import warm_up
from worker.distributed import ParallelContext
from worker.engine.engine import Engine, EngineConfig
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer

BS = 16


def _request(rid: int, ids: list[int], max_new: int, blocks: list[int], cache_len: int = 0):
    """Router blocks with exactly prompt + max_new_tokens - 1 slots (LoRAX's router), in the blocks' order."""
    n = len(ids) + max_new - 1
    slots = [b * BS + j for b in blocks for j in range(BS)][:n]
    assert len(blocks) == -(-n // BS) and len(slots) == n
    return chunk_request(rid, ids, max_new, blocks=blocks, slots=slots, cache_len=cache_len)


def test_a_stopping_row_writes_no_block_it_does_not_own(demo_dir):
    model_dir = os.path.join(demo_dir, "model")
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    cfg = EngineConfig(
        max_total_tokens=4096, shard_block_fraction=0.5, cuda_graphs=False, look_ahead=True, look_ahead_fed=True
    )
    engine = warm_up(Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg))
    prompt = [(7 * i + 3) % 200 + 5 for i in range(31)]
    # request 1: 31 + 2 - 1 = 32 slots fill blocks 10 and 3; its second token stops it, and that token's fed row
    # is at position 32, past its slots and its blocks
    _, b1 = engine.prefill(pb.Batch(id=1, size=1, requests=[_request(1, prompt, 2, [10, 3])]), None)
    # request 2 shares block 10 (the prompt's first 16 tokens) as a router's prefix cache hands it out
    shared = _request(2, prompt[:16] + [9, 8, 7, 6, 5], 6, [10, 7], cache_len=BS)
    _, b2 = engine.prefill(pb.Batch(id=2, size=1, requests=[shared]), None)
    assert b1 is not None and b2 is not None
    kv = engine.kv
    assert kv is not None
    before = [(k.clone(), v.clone()) for k, v in kv.layers]
    gens, batch = engine.decode([b1.info(), b2.info()])
    assert [g.request_id for g in gens if g.generated_text is not None] == [1]
    assert batch is not None and [r.id for r in batch.requests] == [2] and batch.requests[0].ahead is not None
    scratch = kv.num_blocks - 1
    changed = {
        b
        for (k0, v0), (k1, v1) in zip(before, kv.layers)
        for b in range(kv.num_blocks)
        if not (torch.equal(k0[b], k1[b]) and torch.equal(v0[b], v1[b]))
    }
    # the fed forward wrote request 2's next position (its block 7) and request 1's row into the scratch block
    assert changed == {7, scratch}
