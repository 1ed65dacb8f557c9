"""The engine/runner split: the runner sizes and owns the KV cache, the engine partitions its blocks."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, write_checkpoint
from random_weights import random_checkpoint
from worker.distributed import ParallelContext
from worker.engine.engine import Engine, EngineConfig
from worker.engine.warmup import kv_blocks
from worker.errors import ResourceExhausted
from worker.models.qwen import FlashQwenForCausalLM


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> FlashQwenForCausalLM:
    path = write_checkpoint(str(tmp_path_factory.mktemp("tiny")), TINY, random_checkpoint(TINY, 0))
    return FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)


def test_kv_blocks_sizing(model, monkeypatch):
    cpu, gpu = ParallelContext(), ParallelContext(device=torch.device("cuda"))
    cfg = EngineConfig(block_size=16, max_total_tokens=100, cpu_default_tokens=40, memory_fraction=0.5)
    assert kv_blocks(model, gpu, cfg, activation_peak=0) == 7  # --max-total-tokens wins everywhere
    cfg.max_total_tokens = 0
    assert kv_blocks(model, cpu, cfg, activation_peak=0) == 3  # a CPU: cpu_default_tokens
    assert kv_blocks(model, gpu, cfg, activation_peak=None) == 3  # a GPU before Warmup: the same
    per_block = 2 * TINY["num_hidden_layers"] * TINY["num_attention_heads"] * TINY["kv_channels"] * 4 * 16
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * per_block + 2**20, 0))
    assert kv_blocks(model, gpu, cfg, activation_peak=2**20) == 500  # half of what the activations leave
    with pytest.raises(ResourceExhausted, match="not enough GPU memory"):
        kv_blocks(model, gpu, cfg, activation_peak=1000 * per_block + 2**20)


def test_the_runner_owns_the_cache_and_the_engine_partitions_it(model):
    engine = Engine(
        model,
        None,
        ParallelContext(),
        EngineConfig(max_total_tokens=64 * 16, shard_block_fraction=0.25, cuda_graphs=False),
    )
    assert engine.runner is None and engine.kv is None
    engine.allocate_cache(64)
    assert engine.kv is engine.runner.kv and engine.kv.num_blocks == 64 and engine.runner.graphs is None
    assert engine.router_blocks == 48 and engine.max_supported_total_tokens == 48 * 16
    allocator = engine.allocator  # the shard's own blocks: after the router's, before the scratch block (the last)
    assert (allocator.first, allocator.count) == (48, 15)
    engine.allocate_cache(1)
    assert engine.kv.num_blocks == 3 and engine.router_blocks == 1  # a graph needs a scratch block: at least 3


def test_health_under_tp_does_not_run_the_model(model, monkeypatch):
    """A forward under TP needs every shard's collectives: Health sent to one shard must not start one."""
    engine = Engine(model, None, ParallelContext(), EngineConfig(cuda_graphs=False))
    calls = []
    logits = torch.zeros(1, TINY["vocab_size"])
    monkeypatch.setattr(type(model), "forward_context", lambda *a, **kw: calls.append(a) or logits)
    monkeypatch.setattr(engine, "pctx", ParallelContext(rank=0, world_size=2))
    engine.health()
    assert calls == []
    monkeypatch.setattr(engine, "pctx", ParallelContext())
    engine.health()
    assert len(calls) == 1
    logits[0, 3] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite logits"):
        engine.health()
