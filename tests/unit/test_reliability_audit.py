"""Tests a mutation audit of the suite showed missing (issue 18): each fails on a plausible one-line bug.

- dynamic-NTK alpha recomputed from the current length instead of fixed at prefill (generation past 2x seq_length);
- a row-parallel bias added on every rank (a no_bias=false checkpoint at TP=2);
- FilterBatch not freeing the blocks of the requests it drops;
- a router block equal to the shard's first own block accepted;
- the look-ahead's whole-tensor shortcut taken for a permuted FilterBatch.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from helpers import TINY, write_checkpoint
from lora_helpers import write_adapter
from paged import Paged
from pb_requests import greedy_request, paged_request
from random_weights import random_checkpoint
from reference import load_checkpoint, ref_greedy
from tp_worker import run_world
from worker.distributed import ParallelContext
from worker.engine.engine import Engine, EngineConfig
from worker.errors import InvalidArgument
from worker.layers.rotary import ntk_alpha
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer

BS = 16


def _engine(model_dir: str, look_ahead: bool = False) -> Engine:
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    cfg = EngineConfig(max_total_tokens=2048, shard_block_fraction=0.25, cuda_graphs=False, look_ahead=look_ahead)
    engine = Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg)
    engine.warmup(pb.WarmupRequest(batch=pb.Batch(id=0, requests=[_request(0, [1, 2, 3], 2)]), max_input_length=64))
    return engine


def _request(rid: int, ids: list[int], max_new: int, blocks: list[int] | None = None) -> pb.Request:
    if blocks is None:
        return greedy_request(rid, ids, max_new)
    return paged_request(rid, ids, max_new, blocks, BS)


def _tokens(generations, out: dict[int, list[int]]) -> None:
    for g in generations:
        out.setdefault(g.request_id, []).extend(g.next_tokens.ids)


@pytest.fixture(scope="module")
def demo_engine(demo_dir) -> Engine:
    return _engine(os.path.join(demo_dir, "model"))


def test_dynamic_ntk_alpha_stays_the_prompts_past_twice_seq_length(demo_dir, tmp_path):
    """A model with seq_length 16 generates to 40+ tokens: alpha stays what the prompt's length gave."""
    model_dir = str(tmp_path / "model")
    shutil.copytree(os.path.join(demo_dir, "model"), model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({**raw, "seq_length": 16, "use_dynamic_ntk": True}, f)
    engine = _engine(model_dir)
    prompts = {1: list(range(20, 30)), 2: list(range(40, 60))}  # alpha 1 and alpha 3 at prefill
    assert [ntk_alpha(len(p), 16, True) for p in prompts.values()] == [1.0, 3.0]
    out: dict[int, list[int]] = {}
    gens, batch = engine.prefill(pb.Batch(id=1, requests=[_request(k, p, 30) for k, p in prompts.items()]), None)
    _tokens(gens, out)
    while batch is not None:
        gens, batch = engine.decode([batch.info()])
        _tokens(gens, out)
    state, cfg = load_checkpoint(model_dir)
    for k, p in prompts.items():
        assert len(p) + 30 > 2 * 16 and out[k] == ref_greedy(state, cfg, p, 30), k


def test_row_parallel_bias_is_added_once_under_tp(tmp_path):
    """no_bias=false: attn.c_proj and mlp.c_proj (row parallel) carry a bias, added once after the all-reduce."""
    cfg = {**TINY, "seq_length": 8, "no_bias": False}
    state = random_checkpoint(cfg, seed=5)
    g = torch.Generator().manual_seed(1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        width = cfg["intermediate_size"] // 2
        for name, size in [("attn.c_proj", 64), ("mlp.c_proj", 64), ("mlp.w1", width), ("mlp.w2", width)]:
            state[p + name + ".bias"] = 0.5 * torch.randn(size, generator=g)
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), cfg, state)
    model = FlashQwenForCausalLM.from_pretrained(ckpt, dtype=torch.float32, progress=False)
    assert model.transformer.layers()[0].attn.c_proj.bias is not None
    gen = torch.Generator().manual_seed(0)  # tests/tp_worker.py's prompts
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 7, 21)]
    alphas = [ntk_alpha(len(p), cfg["seq_length"], True) for p in prompts]
    single = Paged(model, seed=3).step([0, 1, 2], prompts, [0, 0, 0], alphas, prefill=True)
    root = str(tmp_path / "adapters")  # tests/tp_worker.py also runs its adapter batch
    write_adapter(root, "a4", cfg, 4, 8, seed=1)
    write_adapter(root, "a16", cfg, 16, 16, seed=2)
    for rank_result in run_world(ckpt, str(tmp_path / "w2"), 2, root):
        for k, ref in enumerate(single):
            assert (rank_result[f"prefill{k}"] - ref).abs().max().item() <= 1e-4, k


def test_filter_batch_frees_the_blocks_of_the_requests_it_drops(demo_engine):
    engine = demo_engine
    free = engine.allocator.free
    reqs = [_request(10 + k, list(range(5, 5 + n)), 8) for k, n in enumerate([3, 20, 40])]
    _, batch = engine.prefill(pb.Batch(id=10, requests=reqs), None)
    held = {r.id: len(r.blocks) for r in batch.requests}
    assert engine.allocator.free == free - sum(held.values()) and held[12] > 1
    engine.filter(10, [11])
    assert engine.allocator.free == free - held[11]
    engine.clear(10)
    assert engine.allocator.free == free


def test_a_router_block_equal_to_the_shards_first_own_block_is_refused(demo_engine):
    engine = demo_engine
    first_own = engine.router_blocks
    assert engine.allocator.first == first_own
    with pytest.raises(InvalidArgument, match=f"block {first_own} is out of range"):
        engine.prefill(pb.Batch(id=20, requests=[_request(20, [5, 6, 7], 4, blocks=[first_own])]), None)
    _, batch = engine.prefill(pb.Batch(id=20, requests=[_request(20, [5, 6, 7], 4, blocks=[first_own - 1])]), None)
    assert batch is not None  # the router's last block is the router's
    engine.clear(20)


def _permuted_script(engine: Engine) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    reqs = [_request(31, [3, 4, 5], 9), _request(32, [100, 200, 300, 7], 9), _request(33, [50, 9], 9)]
    gens, batch = engine.prefill(pb.Batch(id=30, requests=reqs), None)
    _tokens(gens, out)
    assert batch is not None
    gens, batch = engine.decode([batch.info()])
    _tokens(gens, out)
    batch = engine.filter(30, [33, 31, 32])  # every request kept, in another order
    while batch is not None:
        gens, batch = engine.decode([batch.info()])
        _tokens(gens, out)
    return out


def test_a_permuted_filter_batch_does_not_reuse_the_look_ahead_in_its_old_order(demo_dir, demo_engine):
    with_look_ahead = _engine(os.path.join(demo_dir, "model"), look_ahead=True)
    expected = _permuted_script(demo_engine)
    assert len({tuple(v) for v in expected.values()}) == 3 and all(len(v) == 9 for v in expected.values())
    assert _permuted_script(with_look_ahead) == expected


def test_self_allocated_slots_cover_prompt_and_generation(demo_engine):
    """The shard's own blocks hold prompt + max_new_tokens - 1 slots (what the router would allocate)."""
    engine = demo_engine
    _, batch = engine.prefill(pb.Batch(id=40, requests=[_request(40, list(range(1, 18)), 16)]), None)
    (r,) = batch.requests
    assert len(r.slots) == 17 + 16 - 1 and len(r.blocks) == math.ceil(32 / BS)
    engine.clear(40)
