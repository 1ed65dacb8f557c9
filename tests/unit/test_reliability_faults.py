"""Faults inside one shard: an out-of-memory in one Prefill and a LoadAdapter that fails half way.

Each must fail alone: the running batch decodes on with the tokens it would have had, the adapter pool
holds exactly what it held (the failed slot zeroed again, the index not half-known), and the next calls
succeed.
"""

from __future__ import annotations

import os

import grpc
import pytest
import torch

from helpers import TINY, write_checkpoint
from lora_helpers import attach_manager, load, write_adapter
from paged import Paged
from pb_requests import greedy_request as _request
from random_weights import random_checkpoint
from worker.distributed import ParallelContext
from worker.engine.engine import Engine, EngineConfig
from worker.errors import status_of
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer


def _decode_all(engine: Engine, batch, out: list[int]) -> None:
    while batch is not None:
        gens, batch = engine.decode([batch.info()])
        out += [t for g in gens for t in g.next_tokens.ids]


def test_an_out_of_memory_prefill_fails_alone(demo_dir, monkeypatch):
    model_dir = os.path.join(demo_dir, "model")
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    cfg = EngineConfig(max_total_tokens=1024, shard_block_fraction=0.5, cuda_graphs=False, look_ahead=False)
    engine = Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg)
    engine.warmup(pb.WarmupRequest(batch=pb.Batch(id=0, requests=[_request(0, [1, 2], 2)]), max_input_length=8))

    def run(inject: bool) -> list[int]:
        gens, batch = engine.prefill(pb.Batch(id=1, requests=[_request(1, [7, 8, 9], 12)]), None)
        out = [t for g in gens for t in g.next_tokens.ids]
        gens, batch = engine.decode([batch.info()])
        out += [t for g in gens for t in g.next_tokens.ids]
        free = engine.allocator.free
        if inject:
            forward = engine.runner.forward

            def oom(b, prefill, slots=None, spans=None):
                if prefill:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
                return forward(b, prefill, slots, spans)

            monkeypatch.setattr(engine.runner, "forward", oom)
            with pytest.raises(torch.OutOfMemoryError) as err:
                engine.prefill(pb.Batch(id=2, requests=[_request(2, [3, 4, 5, 6], 6)]), None)
            assert status_of(err.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
            monkeypatch.setattr(engine.runner, "forward", forward)
            assert engine.allocator.free == free and list(engine.batches) == [1]  # its blocks are back
        _decode_all(engine, batch, out)
        return out

    assert run(inject=True) == run(inject=False)
    assert engine.batches == {}


def test_a_load_adapter_that_fails_half_way_is_rolled_back(tmp_path, monkeypatch):
    cfg = {**TINY, "seq_length": 16}
    model = FlashQwenForCausalLM.from_pretrained(
        write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, seed=3)),
        dtype=torch.float32,
        progress=False,
    )
    root = str(tmp_path / "adapters")
    write_adapter(root, "a", cfg, 4, 8, seed=1)
    write_adapter(root, "b", cfg, 8, 8, seed=2)
    mgr, _ = attach_manager(model, root, max_rank=8, num_slots=2)
    load(mgr, 1, "a")
    slot_a = mgr.entries[1].slot
    prompt = list(range(30, 41))
    before = Paged(model).step([0], [prompt], [0], [1.0], True, [slot_a])[0]
    pools = [p.clone() for pair in mgr.slots.pools.values() for p in pair]
    real = mgr.slots.copy_into

    def half_way(slot, host, src, ranks, non_blocking):
        key = next(iter(host.tensors(src)))
        mgr.slots.pools[key][0][slot].fill_(1.0)  # the first module's A written, then the copy fails
        raise RuntimeError("injected: the adapter copy failed half way")

    monkeypatch.setattr(mgr.slots, "copy_into", half_way)
    with pytest.raises(RuntimeError, match="half way"):
        load(mgr, 2, "b")
    monkeypatch.setattr(mgr.slots, "copy_into", real)
    assert all(torch.equal(p, q) for p, q in zip(pools, [p for pair in mgr.slots.pools.values() for p in pair]))
    assert not mgr.has(2) and mgr.slot_owner.count(2) == 0 and mgr.stats()["adapter_slots_used"] == 1
    assert torch.equal(Paged(model).step([0], [prompt], [0], [1.0], True, [slot_a])[0], before)  # "a" untouched
    load(mgr, 2, "b")  # and the next load succeeds
    assert mgr.entries[2].slot is not None and mgr.stats()["adapter_slots_used"] == 2
