"""worker/wire.py: the engine's step results become exactly the contract's protobuf messages."""

from __future__ import annotations

import math

import pytest

from worker.engine.generations import Alternatives, CachedBatchInfo, GeneratedText, Generation, Tokens
from worker.engine.stopping import FinishReason
from worker.pb import generate_pb2 as pb
from worker.wire import cached_batch_pb, generation_pb, step_response


def _tokens(ids: list[int], **kw) -> Tokens:
    return Tokens(
        ids=ids, logprobs=[-0.5] * len(ids), texts=[f"t{i}" for i in ids], is_special=[False] * len(ids), **kw
    )


def test_finish_reasons_are_the_proto_enum():
    assert {r.name: int(r) for r in FinishReason} == dict(pb.FinishReason.items())


def test_a_decode_generation_has_only_its_next_token():
    alts = [Alternatives(ids=[7, 3], logprobs=[-0.1, -2.5], texts=["a", "b"])]
    msg = generation_pb(Generation(request_id=2**64 - 1, next_tokens=_tokens([7], alternative_tokens=alts)))
    assert msg.request_id == 2**64 - 1 and list(msg.next_tokens.ids) == [7] and msg.next_tokens.texts == ["t7"]
    assert list(msg.next_tokens.logprobs) == [-0.5] and list(msg.next_tokens.is_special) == [False]
    (alt,) = msg.next_tokens.alternative_tokens
    assert list(alt.ids) == [7, 3] and list(alt.logprobs) == [pytest.approx(-0.1), -2.5] and alt.texts == ["a", "b"]
    assert not msg.HasField("prefill_tokens") and not msg.HasField("generated_text")
    assert msg.prefill_tokens_length == 0


def test_a_finished_prefill_generation():
    prompt = _tokens([1, 2, 3])
    prompt.logprobs[0] = math.nan  # the first prompt token has none
    gen = Generation(
        request_id=5,
        next_tokens=_tokens([9]),
        prefill_tokens=prompt,
        prefill_tokens_length=3,
        generated_text=GeneratedText(
            text="done", generated_tokens=1, finish_reason=FinishReason.FINISH_REASON_EOS_TOKEN
        ),
    )
    msg = generation_pb(gen)
    assert list(msg.prefill_tokens.ids) == [1, 2, 3] and math.isnan(msg.prefill_tokens.logprobs[0])
    assert msg.prefill_tokens_length == 3
    assert msg.generated_text.text == "done" and msg.generated_text.generated_tokens == 1
    assert msg.generated_text.finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert not msg.generated_text.HasField("seed")  # greedy: no seed on the wire
    gen.generated_text.seed = 2**63 + 1
    assert generation_pb(gen).generated_text.seed == 2**63 + 1


def test_step_response_and_cached_batch():
    info = CachedBatchInfo(id=4, request_ids=[1, 2], size=2, max_tokens=64, current_tokens=2)
    assert cached_batch_pb(info) == pb.CachedBatch(id=4, request_ids=[1, 2], size=2, max_tokens=64, current_tokens=2)
    gen = Generation(request_id=1, next_tokens=_tokens([3]))
    resp = step_response(pb.DecodeResponse, [gen], info)
    assert isinstance(resp, pb.DecodeResponse) and resp.batch.id == 4 and resp.generations[0].request_id == 1
    done = step_response(pb.PrefillResponse, [gen], None)
    assert isinstance(done, pb.PrefillResponse) and not done.HasField("batch") and len(done.generations) == 1
