"""A router's script for the look-ahead tests (CPU: tests/unit/test_look_ahead_fed.py, GPU with CUDA graphs:
tests/gpu/test_gpu_look_ahead.py): Prefill / Decode / concatenation / FilterBatch with greedy and seeded-sampling
requests, a stop sequence hit mid-batch, requests finishing at max_new_tokens and new requests taking the blocks
of finished ones; a Router that records what the router would see and how each Decode got its logits."""

from __future__ import annotations

import pytest

from worker.engine.batch import Batch
from worker.engine.engine import Engine
from worker.pb import generate_pb2 as pb


def request(rid: int, text: str, max_new: int, stop: tuple[str, ...] = (), **sampling) -> pb.Request:
    params = pb.NextTokenChooserParameters(
        **{"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, **sampling}
    )
    stopping = pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True, stop_sequences=stop)
    return pb.Request(id=rid, inputs=text, parameters=params, stopping_parameters=stopping)


class Router:
    """Drives an engine through the script; records every generation and, per Decode, the rows the Decode ran a
    forward for (a fed look-ahead's launch is not counted) and whether it fed the next step's forward."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.log: list[list[tuple]] = []
        self.computed: list[int] = []  # per Decode
        self.fed: list[bool] = []  # per Decode
        self.cached: list[bool] = []  # per Decode: the surviving requests' K/V are cached up to their last token
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
        self.log.append(record(gens))
        return batch

    def decode(self, *batches: Batch) -> Batch | None:
        self.computed.append(0)
        self.fed.append(False)
        self.state["count"] = True
        try:
            gens, batch = self.engine.decode([b.info() for b in batches])
        finally:
            self.state["count"] = False
        self.log.append(record(gens))
        self.cached.append(batch is None or all(r.n_cached == len(r.ids) for r in batch.requests))
        return batch


def record(generations) -> list[tuple]:
    out = []
    for g in generations:
        t = g.next_tokens
        done = (g.generated_text.text, g.generated_text.finish_reason) if g.generated_text is not None else None
        out.append((g.request_id, list(t.ids), list(t.texts), list(t.logprobs), done))
    return out


def script(router: Router, stop: tuple[str, ...]) -> list:
    b1 = router.prefill(
        1,
        [
            request(1, "Once upon a time", 5),  # finishes at max_new_tokens mid-batch
            request(2, "The pirate said", 14, temperature=0.8, seed=7, do_sample=True),
            request(3, "A robot walks", 14, stop=stop),  # its stop sequence hits mid-batch
            request(6, "Far away", 14, top_k=4, seed=11, do_sample=True),
        ],
    )
    for _ in range(3):
        assert b1 is not None
        b1 = router.decode(b1)
    b2 = router.prefill(
        2, [request(4, "In the morning", 10, top_k=5, seed=3, do_sample=True), request(5, "Hello there", 10)]
    )
    assert b1 is not None and b2 is not None
    batch = router.decode(b1, b2)  # concatenated
    assert batch is not None
    batch = router.decode(batch)
    assert batch is not None
    batch = router.engine.filter(batch.id, [r.id for r in batch.requests if r.id != 6])  # the router drops one
    batch = router.decode(batch)
    # a new batch whose requests take the blocks of those that finished, concatenated with the running one
    b3 = router.prefill(3, [request(7, "Blocks reused", 6), request(8, "Again and again", 3)])
    assert batch is not None and b3 is not None
    batch = router.decode(batch, b3)
    while batch is not None:
        batch = router.decode(batch)
    return router.log


def first_text(log: list, rid: int, token: int) -> str:
    texts = [t for step in log for g in step if g[0] == rid for t in g[2]]
    return texts[token]


def warm_up(engine: Engine) -> Engine:
    engine.warmup(
        pb.WarmupRequest(
            batch=pb.Batch(id=0, requests=[request(0, "warm up", 4)], size=1),
            max_input_length=64,
            max_prefill_tokens=256,
            max_new_tokens=32,
        )
    )
    return engine


def assert_same(got: list, expected: list, logprob_tol: float) -> None:
    """The same generations step by step: ids, texts and finish reasons exactly, logprobs within the tolerance."""
    assert len(got) == len(expected) and sum(len(step) for step in got) > 50
    for step_got, step_want in zip(got, expected):
        assert [(g[0], g[1], g[2], g[4]) for g in step_got] == [(g[0], g[1], g[2], g[4]) for g in step_want]
        for g, w in zip(step_got, step_want):
            assert g[3] == pytest.approx(w[3], abs=logprob_tol)
