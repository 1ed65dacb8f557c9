"""The look-ahead fed on the device (EngineConfig.look_ahead_fed): the next forward launches right after the
sampler, with the chosen ids still on the device, before they are appended. What the router sees must not
change: a scripted sequence of Prefill / Decode / concatenation / FilterBatch, with greedy and seeded-sampling
requests, a stop sequence hit mid-batch and requests finishing at max_new_tokens, gives the same tokens, texts,
finish reasons and logprobs as without any look-ahead; the Decodes take every row from the fed look-ahead."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from worker.distributed import ParallelContext
from worker.engine import lookahead
from worker.engine.batch import Ahead, Batch
from worker.engine.cuda_graphs import slot_at
from worker.engine.engine import Engine, EngineConfig
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer


def _engine(model_dir: str, look_ahead: bool, fed: bool) -> Engine:
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    cfg = EngineConfig(
        max_total_tokens=4096, shard_block_fraction=0.5, cuda_graphs=False, look_ahead=look_ahead, look_ahead_fed=fed
    )
    engine = Engine(model, QwenTokenizer.from_dir(model_dir), ParallelContext(), cfg)
    engine.warmup(
        pb.WarmupRequest(
            batch=pb.Batch(id=0, requests=[_request(0, "warm up", 4)], size=1),
            max_input_length=64,
            max_prefill_tokens=256,
            max_new_tokens=32,
        )
    )
    return engine


def _request(rid: int, text: str, max_new: int, stop: tuple[str, ...] = (), **sampling) -> pb.Request:
    params = pb.NextTokenChooserParameters(
        **{"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, **sampling}
    )
    stopping = pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True, stop_sequences=stop)
    return pb.Request(id=rid, inputs=text, parameters=params, stopping_parameters=stopping)


class Router:
    """Drives an engine through the script; records every generation and, per Decode, the rows the Decode ran a
    forward for (a fed look-ahead's launch is not counted) and whether it fed the next step's forward."""

    def __init__(self, engine: Engine):
        self.engine, self.log, self.computed, self.fed = engine, [], [], []
        runner = engine.runner
        assert runner is not None
        forward, state = runner.forward, {"count": False}

        def counting(batch, prefill, adapter_slots=None, spans=None, speculative=False):
            if state["count"] and not prefill:
                self.computed[-1] += len(batch.requests)
            return forward(batch, prefill, adapter_slots, spans, speculative)

        def uncounted(run):
            def wrapped(*a):
                was, state["count"] = state["count"], False
                try:
                    return run(*a)
                finally:
                    state["count"] = was

            return wrapped

        fed_look_ahead = engine._fed_look_ahead

        def noting_feed(batch):
            feed = fed_look_ahead(batch)
            if feed is None:
                return None

            def feed_and_note(ids):
                launched = uncounted(feed)(ids)
                self.fed[-1] = launched
                return launched

            return feed_and_note

        setattr(runner, "forward", counting)  # noqa: B010 - mypy refuses assigning to a method
        setattr(engine, "_look_ahead", uncounted(engine._look_ahead))  # noqa: B010
        setattr(engine, "_fed_look_ahead", noting_feed)  # noqa: B010
        self.state = state

    def prefill(self, batch_id: int, requests: list[pb.Request]) -> Batch | None:
        gens, batch = self.engine.prefill(pb.Batch(id=batch_id, size=len(requests), requests=requests), None)
        self.log.append(_record(gens))
        return batch

    def decode(self, *batches: Batch) -> Batch | None:
        self.computed.append(0)
        self.fed.append(False)
        self.state["count"] = True
        try:
            gens, batch = self.engine.decode([b.info() for b in batches])
        finally:
            self.state["count"] = False
        self.log.append(_record(gens))
        return batch


def _record(generations) -> list[tuple]:
    out = []
    for g in generations:
        t = g.next_tokens
        done = (g.generated_text.text, g.generated_text.finish_reason) if g.generated_text is not None else None
        out.append((g.request_id, list(t.ids), list(t.texts), list(t.logprobs), done))
    return out


def _script(router: Router, stop: tuple[str, ...]) -> list:
    b1 = router.prefill(
        1,
        [
            _request(1, "Once upon a time", 5),  # finishes at max_new_tokens mid-batch
            _request(2, "The pirate said", 14, temperature=0.8, seed=7, do_sample=True),
            _request(3, "A robot walks", 14, stop=stop),  # its stop sequence hits mid-batch
            _request(6, "Far away", 14, top_k=4, seed=11, do_sample=True),
        ],
    )
    for _ in range(3):
        assert b1 is not None
        b1 = router.decode(b1)
    b2 = router.prefill(
        2, [_request(4, "In the morning", 10, top_k=5, seed=3, do_sample=True), _request(5, "Hello there", 10)]
    )
    assert b1 is not None and b2 is not None
    batch = router.decode(b1, b2)  # concatenated
    assert batch is not None
    batch = router.decode(batch)
    assert batch is not None
    batch = router.engine.filter(batch.id, [r.id for r in batch.requests if r.id != 6])  # the router drops one
    batch = router.decode(batch)
    # a new batch whose requests take the blocks of those that finished, concatenated with the running one
    b3 = router.prefill(3, [_request(7, "Blocks reused", 6), _request(8, "Again and again", 3)])
    assert batch is not None and b3 is not None
    batch = router.decode(batch, b3)
    while batch is not None:
        batch = router.decode(batch)
    return router.log


def _first_text(log: list, rid: int, token: int) -> str:
    texts = [t for step in log for g in step if g[0] == rid for t in g[2]]
    return texts[token]


@pytest.fixture(scope="module")
def model_dir(demo_dir):
    return os.path.join(demo_dir, "model")


def test_fed_look_ahead_changes_nothing_the_router_sees(model_dir):
    probe = _script(Router(_engine(model_dir, False, False)), ())
    stop = (_first_text(probe, 3, 3),)  # request 3's 4th token's text: it stops there (or at an earlier copy)
    assert stop[0]
    off = Router(_engine(model_dir, False, False))
    fed = Router(_engine(model_dir, True, True))
    expected, got = _script(off, stop), _script(fed, stop)
    finished = {g[0]: g[4][1] for step in expected for g in step if g[4] is not None}
    assert finished[3] == pb.FINISH_REASON_STOP_SEQUENCE and finished[1] == pb.FINISH_REASON_LENGTH
    assert len(got) == len(expected) and sum(len(step) for step in got) > 50
    for step_fed, step_off in zip(got, expected):
        assert [(g[0], g[1], g[2], g[4]) for g in step_fed] == [(g[0], g[1], g[2], g[4]) for g in step_off]
        for g_fed, g_off in zip(step_fed, step_off):
            assert g_fed[3] == pytest.approx(g_off[3], abs=1e-4)
    assert all(n > 0 for n in off.computed) and not any(off.fed)
    # every Decode fed the next step's forward, and no Decode ran one of its own
    assert fed.computed == [0] * len(fed.computed)
    assert fed.fed == [True] * len(fed.fed)
    assert fed.engine.batches == {} and fed.engine.allocator.free == off.engine.allocator.free


def test_only_plain_decode_steps_feed():
    """Drafts or Medusa heads would follow the step's tokens: those batches keep the look-ahead after apply."""
    engine = Engine.__new__(Engine)
    batch = SimpleNamespace(requests=[object()] * 3)
    big = SimpleNamespace(requests=[object()] * 40)
    for fed, tokens, heads, b, feeds in [
        (True, 0, 0, batch, True),
        (False, 0, 0, batch, False),
        (True, 4, 0, batch, False),  # prompt-lookup drafts for a batch that verifies
        (True, 4, 0, big, True),  # too large to verify drafts: plain decode
        (True, 0, 3, batch, False),  # Medusa heads attached
    ]:
        engine.cfg = EngineConfig(look_ahead_fed=fed, speculative_tokens=tokens)
        engine.model = SimpleNamespace(medusa_heads=heads)
        assert engine._feeds(b) == feeds, (fed, tokens, heads, len(b.requests))


def test_a_row_past_its_slots_writes_its_own_block_or_the_scratch_block():
    slots = [40, 41, 42, 43, 20, 21]  # blocks 10 and 5 of 4 slots: positions 0..5 own a slot
    assert slot_at(slots, [10, 5], 5, 99, 4) == 21
    assert slot_at(slots, [10, 5], 6, 99, 4) == 22  # past its slots, still in its own block 5
    assert slot_at(slots, [10, 5], 8, 99, 4) == 99 * 4  # past its blocks: the scratch block, which no one owns
    assert slot_at(slots, [10, 5], 9, 99, 4) == 99 * 4 + 1


def test_a_failed_fed_look_ahead_does_not_fail_the_step(model_dir, monkeypatch, caplog):
    engine = _engine(model_dir, True, True)
    _, batch = engine.prefill(
        pb.Batch(id=1, size=2, requests=[_request(1, "Once upon a time", 4), _request(2, "Hello there", 4)]), None
    )
    assert batch is not None and all(r.ahead is not None for r in batch.requests)
    forward = engine.runner.forward

    def fails_once(b, prefill, slots=None):  # the Decode's rows are looked-ahead: the first call is the fed one
        monkeypatch.setattr(engine.runner, "forward", forward)
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(engine.runner, "forward", fails_once)
    gens, after = engine.decode([batch.info()])
    assert len(gens) == 2 and after is batch and "look-ahead of batch 1 failed" in caplog.text
    # the look-ahead after apply took over: the next Decode still finds its rows
    assert all(r.ahead is not None and r.ahead.length == len(r.ids) for r in batch.requests)
    while after is not None:
        gens, after = engine.decode([after.info()])
    assert engine.batches == {}


def test_rows_of_one_look_ahead_left_by_finished_requests_are_gathered():
    x = torch.arange(12.0).view(3, 4)
    reqs = [SimpleNamespace(ids=[0] * 5, ahead=Ahead(x, 0, 5)), SimpleNamespace(ids=[0] * 5, ahead=Ahead(x, 2, 5))]
    out = lookahead.take_rows(reqs, [True, True], None)
    assert torch.equal(out, x[[0, 2]]) and all(r.ahead is None for r in reqs)
