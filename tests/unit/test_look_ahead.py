"""Decode look-ahead (EngineConfig.look_ahead): each step starts the surviving batch's next forward before
replying. What the router sees must not change: the same scripted sequence of Prefill / Decode /
concatenation / FilterBatch / requests finishing, with greedy and seeded-sampling requests, gives the same
tokens, texts, finish reasons and (within float noise from other batch shapes) logprobs with the look-ahead
on and off; and with it on, the decode steps take their logits from the look-ahead rows, computing only
rows that have none."""

from __future__ import annotations

import os

import pytest
import torch

from look_ahead_script import record, request, warm_up
from worker.distributed import ParallelContext
from worker.engine import lookahead
from worker.engine.batch import Batch
from worker.engine.engine import Engine, EngineConfig
from worker.engine.lookahead import Ahead
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer


def _engine(model_dir: str, look_ahead: bool) -> Engine:
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    # the look-ahead launched after the stop checks (the fed one, the default: tests/unit/test_look_ahead_fed.py)
    cfg = EngineConfig(
        max_total_tokens=4096, shard_block_fraction=0.5, cuda_graphs=False, look_ahead=look_ahead, look_ahead_fed=False
    )
    return Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg)


def _script(engine: Engine, computed_rows: list[int], drop_one_look_ahead: bool) -> list:
    """A router's sequence; returns every generation in order. `computed_rows` collects, per decode step,
    how many rows the Decode itself had to run the forward for."""
    runner_forward = engine.runner.forward if engine.runner else None
    log = []
    warm_up(engine)
    runner = engine.runner
    assert runner is not None
    runner_forward = runner.forward
    in_decode = {"on": False}

    def counting_forward(batch, prefill, adapter_slots=None, spans=None):
        if in_decode["on"] and not prefill:
            computed_rows[-1] += len(batch.requests)
        return runner_forward(batch, prefill, adapter_slots, spans)

    setattr(runner, "forward", counting_forward)  # noqa: B010 - mypy refuses assigning to a method
    real_look_ahead = engine._look_ahead

    def look_ahead_outside_the_count(batch):
        was, in_decode["on"] = in_decode["on"], False
        try:
            real_look_ahead(batch)
        finally:
            in_decode["on"] = was

    setattr(engine, "_look_ahead", look_ahead_outside_the_count)  # noqa: B010

    def decode(cached) -> Batch | None:
        computed_rows.append(0)
        in_decode["on"] = True
        try:
            gens, batch = engine.decode(cached)
        finally:
            in_decode["on"] = False
        log.append(record(gens))
        return batch

    gens, b1 = engine.prefill(
        pb.Batch(
            id=1,
            size=3,
            requests=[
                request(1, "Once upon a time", 5),
                request(2, "The pirate said", 12, temperature=0.8, seed=7, do_sample=True),
                request(3, "A robot walks", 12),
            ],
        ),
        None,
    )
    log.append(record(gens))
    for _ in range(3):
        assert b1 is not None
        b1 = decode([b1.info()])
    gens, b2 = engine.prefill(
        pb.Batch(
            id=2,
            size=2,
            requests=[
                request(4, "In the morning", 10, top_k=5, seed=3, do_sample=True),
                request(5, "Hello there", 10),
            ],
        ),
        None,
    )
    log.append(record(gens))
    assert b1 is not None and b2 is not None
    if drop_one_look_ahead:  # a request without a look-ahead row: the Decode computes that row alone
        b2.requests[0].ahead = None
    batch = decode([b1.info(), b2.info()])  # concatenated; request 1 finishes during these steps
    assert batch is not None
    batch = decode([batch.info()])
    assert batch is not None
    batch = engine.filter(batch.id, [r.id for r in batch.requests if r.id != 3])  # the router drops one
    while batch is not None:
        batch = decode([batch.info()])
    return log


@pytest.mark.parametrize("drop_one", [False, True])
def test_look_ahead_changes_nothing_the_router_sees(demo_dir, drop_one):
    model_dir = os.path.join(demo_dir, "model")
    rows_off, rows_on = [], []
    off = _script(_engine(model_dir, False), rows_off, drop_one)
    on = _script(_engine(model_dir, True), rows_on, drop_one)
    assert len(on) == len(off) and sum(len(step) for step in on) > 40
    for step_on, step_off in zip(on, off):
        assert [(g[0], g[1], g[2], g[4]) for g in step_on] == [(g[0], g[1], g[2], g[4]) for g in step_off]
        for g_on, g_off in zip(step_on, step_off):
            assert g_on[3] == pytest.approx(g_off[3], abs=1e-4)
    assert all(n > 0 for n in rows_off)  # without look-ahead every Decode runs its own forward
    # with it, the Decodes use the look-ahead rows: only the request whose row was dropped is computed
    expect = [0] * len(rows_on)
    if drop_one:
        expect[3] = 1  # the first Decode after batch 2's Prefill (three Decodes of batch 1 alone come before)
    assert rows_on == expect


def test_rows_come_from_their_own_look_ahead():
    from types import SimpleNamespace

    x = torch.arange(12.0).view(3, 4)
    y = 100 + torch.arange(8.0).view(2, 4)
    runner = object()  # no row is missing: the forward is never called

    def logits(*aheads):
        reqs = [SimpleNamespace(ids=[0] * 5, ahead=a) for a in aheads]
        out = lookahead.step_logits(runner, SimpleNamespace(id=1, requests=reqs, sampler=None), False, None).last
        assert all(r.ahead is None for r in reqs)  # used once
        return out

    assert torch.equal(logits(Ahead(x, 0, 5), Ahead(y, 1, 5)), torch.stack([x[0], y[1]]))  # two, concatenated
    z = 200 + torch.arange(8.0).view(2, 4)
    assert torch.equal(logits(Ahead(z, 0, 5), Ahead(y, 1, 5)), torch.stack([z[0], y[1]]))  # same size, in place
    assert torch.equal(logits(Ahead(x, 0, 5), Ahead(x, 1, 5)), x[:2])  # a filter kept a prefix: not all of x
    assert torch.equal(logits(Ahead(x, 2, 5), Ahead(x, 0, 5)), torch.stack([x[2], x[0]]))  # reordered
    assert logits(Ahead(x, 0, 5), Ahead(x, 1, 5), Ahead(x, 2, 5)) is x  # all of one look-ahead, in order: no copy


def test_rows_stale_or_missing_are_computed():
    """A row computed for other tokens (the request's ids grew) does not serve; the computed rows fill in."""
    from types import SimpleNamespace

    x = torch.arange(12.0).view(3, 4)
    reqs = [
        SimpleNamespace(ids=[0] * 5, ahead=Ahead(x, 0, 5)),
        SimpleNamespace(ids=[0] * 6, ahead=Ahead(x, 1, 5)),
        SimpleNamespace(ids=[0] * 5, ahead=None),
    ]
    ready = lookahead.ready(reqs, prefill=False)
    assert ready == [True, False, False] and lookahead.ready(reqs, prefill=True) == [False] * 3
    computed = -1 - torch.arange(8.0).view(2, 4)
    out = lookahead.take_rows(reqs, ready, computed)
    assert torch.equal(out, torch.stack([x[0], computed[0], computed[1]]))
    assert all(r.ahead is None for r in reqs)


def test_a_failed_look_ahead_does_not_fail_the_step(demo_dir, monkeypatch, caplog):
    engine = _engine(os.path.join(demo_dir, "model"), True)
    warm_up(engine)
    gens, batch = engine.prefill(
        pb.Batch(id=1, size=2, requests=[request(1, "Once upon a time", 4), request(2, "Hello there", 4)]), None
    )
    assert all(r.ahead is not None for r in batch.requests)
    forward = engine.runner.forward

    def fails_once(b, prefill, slots=None):  # this Decode's rows are all looked-ahead: the first call is the next
        monkeypatch.setattr(engine.runner, "forward", forward)  # look-ahead's
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engine.runner, "forward", fails_once)
    gens, after = engine.decode([batch.info()])
    assert len(gens) == 2 and after is batch and engine.batches[batch.id] is batch
    assert all(r.ahead is None for r in batch.requests) and "look-ahead of batch 1 failed" in caplog.text
    while after is not None:  # the next Decodes run their own forward and finish the requests
        gens, after = engine.decode([after.info()])
    assert engine.batches == {}


@pytest.mark.parametrize(
    "setting,world,graphed,runs",
    [
        (None, 1, True, True),
        (None, 2, True, False),
        (None, 1, False, False),  # auto: graphs, TP=1 only
        (True, 2, True, True),
        (True, 1, False, True),
        (False, 1, True, False),
    ],
)
def test_when_the_look_ahead_runs(setting, world, graphed, runs):
    from types import SimpleNamespace

    calls = []
    engine = Engine.__new__(Engine)
    engine.cfg = EngineConfig(look_ahead=setting)
    engine.pctx = SimpleNamespace(world_size=world)
    engine.adapters = None
    engine.model = SimpleNamespace(medusa_heads=0)  # no Medusa heads: the look-ahead policy decides
    engine.runner = SimpleNamespace(
        graphs=SimpleNamespace(can_run=lambda b: True) if graphed else None,
        forward=lambda b, prefill, slots: calls.append(b) or SimpleNamespace(last=torch.zeros(1, 4)),
    )
    request = SimpleNamespace(ids=[5, 6], slots=[0, 1, 2], ahead=None, prefilling=False, drafts=[])
    engine._look_ahead(SimpleNamespace(id=1, requests=[request]))
    assert bool(calls) == runs and (request.ahead is not None) == runs


@pytest.mark.parametrize(
    "wanted,graphs,can_run,world,slots,runs,reason",
    [
        (None, True, True, 1, True, True, "auto: CUDA graphs at TP=1"),
        (None, False, False, 1, True, False, "auto: no CUDA graphs"),
        (None, True, False, 1, True, False, "auto: the CUDA graphs do not serve this batch"),
        (None, True, True, 2, True, False, "auto: off under TP"),
        (None, True, True, 1, False, False, "the next position's KV slot is not allocated"),
        (True, False, False, 2, True, True, "on"),
        (True, True, True, 1, False, False, "the next position's KV slot is not allocated"),
        (False, True, True, 1, True, False, "off"),
    ],
)
def test_look_ahead_policy(wanted, graphs, can_run, world, slots, runs, reason):
    decision = lookahead.decide(
        wanted=wanted, graphs_available=graphs, graphs_can_run=can_run, world_size=world, slots_allocated=slots
    )
    assert decision == lookahead.Decision(runs, reason)


def test_look_ahead_setting_as_logged():
    assert (
        lookahead.describe(None, True, 1)
        == "on where CUDA graphs serve the batch, after the stop checks (--look-ahead-fed off)"
    )
    assert lookahead.describe(None, True, 2) == "off (TP: set --look-ahead on to use it)"
    assert lookahead.describe(None, False, 1) == "off (no CUDA graphs)"
    assert lookahead.describe(True, False, 2, fed=True) == "on, fed (--look-ahead-fed)"
    assert lookahead.describe(False, True, 1) == "off"
