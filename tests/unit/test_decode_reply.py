"""A Decode's reply (issue #17, P7): the step's Generations are built after the next forward is launched, so
that the texts, dataclasses and protobufs do not hold the device idle; and the reply's protobufs, filled in
place, keep the contract's field presence (the router reads "finished" and "batch left" from presence)."""

from __future__ import annotations

import os

import torch

from look_ahead_script import request, warm_up
from worker.distributed import ParallelContext
from worker.engine import step
from worker.engine.engine import Engine, EngineConfig
from worker.engine.generations import CachedBatchInfo, GeneratedText, Generation, Tokens
from worker.engine.stopping import FinishReason
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer
from worker.wire import generation_pb, step_response


def test_generations_are_built_after_the_look_ahead_is_launched(demo_dir, monkeypatch):
    model_dir = os.path.join(demo_dir, "model")
    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    # the look-ahead launched after the stop checks (the fed one, the default: tests/unit/test_look_ahead_fed.py)
    cfg = EngineConfig(
        max_total_tokens=4096, shard_block_fraction=0.5, cuda_graphs=False, look_ahead=True, look_ahead_fed=False
    )
    tok = QwenTokenizer.from_dir(model_dir)
    engine = Engine(model, tok, ParallelContext(), cfg)
    warm_up(engine)
    events: list[str] = []
    runner = engine.runner
    assert runner is not None
    runner_forward, build = runner.forward, step.generations

    def forward(*a, **kw):
        events.append("forward")
        return runner_forward(*a, **kw)

    def generations(*a, **kw):
        events.append("generations")
        return build(*a, **kw)

    setattr(runner, "forward", forward)  # noqa: B010 - mypy refuses assigning to a method
    monkeypatch.setattr(step, "generations", generations)
    reqs = [request(1, "Once upon a time", 3), request(2, "The pirate said", 6)]
    gens, batch = engine.prefill(pb.Batch(id=1, size=2, requests=reqs), None)
    ids = {g.request_id: list(g.next_tokens.ids) for g in gens}
    # the Prefill's own forward, then the look-ahead for its first Decode, then the Generations
    assert events == ["forward", "forward", "generations"]
    while batch is not None:
        events.clear()
        gens, batch = engine.decode([batch.info()])
        for g in gens:
            ids[g.request_id] += g.next_tokens.ids
        # a Decode takes the look-ahead's rows: its only forward is the next look-ahead, launched before the
        # Generations are built; the last Decode leaves no batch, hence no look-ahead
        assert events == (["forward", "generations"] if batch is not None else ["generations"])
        done = {g.request_id: g.generated_text for g in gens if g.generated_text is not None}
        for rid, text in done.items():  # built after the look-ahead, from the request's own tokens
            assert text is not None and text.generated_tokens == len(ids[rid])
            assert text.text == tok.decode(ids[rid], skip_special_tokens=True)
    assert [len(ids[1]), len(ids[2])] == [3, 6]


def _tokens(ids: list[int]) -> Tokens:
    return Tokens(ids=ids, logprobs=[-0.5] * len(ids), texts=["t"] * len(ids), is_special=[False] * len(ids))


def test_fields_at_their_defaults_are_still_present():
    """A finished request with an empty text and finish reason LENGTH (0) sets nothing but defaults in
    generated_text; it must still be there, or the router would think the request goes on."""
    done = GeneratedText(text="", generated_tokens=0, finish_reason=FinishReason.FINISH_REASON_LENGTH)
    msg = generation_pb(Generation(request_id=0, next_tokens=_tokens([]), generated_text=done))
    assert msg.HasField("generated_text") and msg.HasField("next_tokens")
    assert not msg.HasField("prefill_tokens")
    msg = generation_pb(Generation(request_id=0, next_tokens=_tokens([3]), prefill_tokens=_tokens([])))
    assert msg.HasField("prefill_tokens") and not msg.HasField("generated_text")
    empty = CachedBatchInfo(id=0, request_ids=[], size=0, max_tokens=0, current_tokens=0)
    assert step_response(pb.DecodeResponse, [], empty).HasField("batch")
    assert not step_response(pb.DecodeResponse, [], None).HasField("batch")
    wire = step_response(pb.PrefillResponse, [], empty).SerializeToString()
    assert pb.PrefillResponse.FromString(wire).HasField("batch")  # presence survives the wire
