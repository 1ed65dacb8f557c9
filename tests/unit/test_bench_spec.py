"""scripts/bench_spec.py's CPU path: its rigged model answers the successor cycle through the real engine, and
prompt lookup is accepted on the copy workload, rejected on the open one, without changing the output."""

from __future__ import annotations

import argparse

import torch

from bench_chunked import Blocks, Tok
from bench_common import build_model
from bench_spec import build_workload, compare, rig_successor
from worker.distributed import ParallelContext
from worker.engine.engine import Engine, EngineConfig
from worker.pb import generate_pb2 as pb


def test_rigged_model_copy_and_open_workloads_through_the_engine() -> None:
    pctx = ParallelContext(device=torch.device("cpu"))
    model = build_model("tiny", pctx, "torch")
    vocab = 1024
    succ = rig_successor(model, vocab, seed=0)
    walk, seen = 0, set()
    while walk not in seen:
        seen.add(walk)
        walk = succ[walk]
    assert len(seen) == vocab  # one cycle through the whole vocabulary
    cfg = EngineConfig(block_size=16, max_total_tokens=2048, speculative_tokens=4)
    engine = Engine(model, Tok(vocab), pctx, cfg)  # type: ignore[arg-type]
    warm = pb.Batch(id=0, requests=[pb.Request(id=0, tokenized_inputs=pb.TokenizedInputs(ids=[1] * 64))])
    engine.warmup(pb.WarmupRequest(batch=warm, max_input_length=64, max_prefill_tokens=64))
    blocks = Blocks(engine.router_blocks, 16)
    args = argparse.Namespace(ctx=40, new=12, edit_every=6, repeats=1)
    copy = compare(engine, blocks, build_workload("copy", succ, 2, args, 1), 4, 10, args)
    assert copy["same_tokens"] and copy["off"]["cycle_ok"] and copy["on"]["cycle_ok"]
    assert copy["on"]["accepted_per_step"] > 2 and copy["off"]["accepted_per_step"] == 1
    opened = compare(engine, blocks, build_workload("open", succ, 1, args, 2), 4, 100, args)
    assert opened["same_tokens"] and opened["on"]["cycle_ok"] and opened["on"]["accepted_per_step"] < 1.2
    assert blocks.held == {}  # every run gave its blocks back
