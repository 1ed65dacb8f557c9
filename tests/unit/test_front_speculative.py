"""Speculative decoding through the HTTP front, driven by the real PyPI clients (lorax-client,
text-generation, openai) and plain HTTP, over a fake shard that accepts 1..S+1 tokens per Decode
(test_router_fakes.py). Every accepted token is streamed as its own event (OpenAI: its own chunk);
expectations come from what the fake put on the wire (`FakeShard.sent`)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import lorax
import openai
import pytest
import text_generation
from test_front_app import Served, front_on_fakes

S = 3


@pytest.fixture
def served() -> Iterator[Served]:
    with front_on_fakes({}, speculate=S) as s:
        yield s


def sent(served: Served, request_id: int = 0) -> list[list[int]]:
    """Token ids of each Generation the fake answered for a request (the router numbers them from 0)."""
    return [ids for rid, ids in served.shard.sent if rid == request_id]


def metric(served: Served, name: str) -> float:
    lines = [line for line in httpx.get(f"{served.url}/metrics").text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[1]) if lines else 0.0


def test_lorax_client_streams_every_accepted_token(served: Served) -> None:
    events = list(lorax.Client(served.url).generate_stream("hi", max_new_tokens=12))
    steps = sent(served)
    tokens = [t for s in steps for t in s]
    assert len(tokens) == 12 and max(len(s) for s in steps) > 1
    assert [e.token.id for e in events] == tokens
    assert "".join(e.token.text for e in events) == events[-1].generated_text == "".join(f"<{t}>" for t in tokens)
    assert all(e.details is None for e in events[:-1]) and events[-1].details.generated_tokens == 12
    raw = httpx.post(f"{served.url}/generate_stream", json={"inputs": "hi", "parameters": {"max_new_tokens": 12}})
    last = json.loads([line for line in raw.text.splitlines() if line.startswith("data:")][-1][5:])
    assert last["details"]["skipped_tokens"] == sum(len(s) - 1 for s in sent(served, 1)) > 0


def test_generate_details_carry_the_shards_skipped_tokens(served: Served) -> None:
    res = lorax.Client(served.url).generate("hi", max_new_tokens=10, details=True)
    assert [t.id for t in res.details.tokens] == [t for s in sent(served, 0) for t in s]
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 10, "details": True}}
    raw = httpx.post(f"{served.url}/generate", json=body).json()
    skipped = [sum(len(s) - 1 for s in sent(served, rid)) for rid in (0, 1)]
    assert raw["details"]["skipped_tokens"] == skipped[1] > 0
    assert metric(served, "lorax_request_skipped_tokens_sum") == sum(skipped)


def test_text_generation_client_streams_every_token(served: Served) -> None:
    events = list(text_generation.Client(served.url).generate_stream("hi", max_new_tokens=9))
    tokens = [t for s in sent(served) for t in s]
    assert [e.token.id for e in events] == tokens and len(tokens) == 9
    assert events[-1].details.finish_reason.value == "length"


def test_a_stop_inside_a_step_ends_every_stream_there(served: Served) -> None:
    """The first request's steps are [0], [1, 2], [3, 4, 5]: a stop on token 4 drops token 5."""
    events = list(lorax.Client(served.url).generate_stream("hi", max_new_tokens=30, stop_sequences=["<4>"]))
    assert sent(served, 0)[2] == [3, 4]
    assert [e.token.id for e in events] == [0, 1, 2, 3, 4]
    assert events[-1].details.finish_reason.value == "stop_sequence" and events[-1].generated_text.endswith("<4>")
    oai = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    chunks = list(oai.completions.create(model="", prompt="hi", max_tokens=30, stop=["<4>"], stream=True))
    assert sent(served, 1) == [[1], [2, 3, 4]]  # then OpenAI cuts the stop sequence out of the text
    assert "".join(c.choices[0].text for c in chunks) == "<1><2><3>"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_streams_one_chunk_per_token_and_counts_them_all(served: Served) -> None:
    oai = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0)
    stream = oai.completions.create(
        model="", prompt="hi", max_tokens=11, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    tokens = [t for s in sent(served) for t in s]
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert texts == [f"<{t}>" for t in tokens]  # one chunk per accepted token
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 11
    chat = oai.chat.completions.create(
        model="",
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],  # fits max_input_length 32
        max_tokens=8,
    )
    assert chat.usage is not None and chat.usage.completion_tokens == 8 and chat.choices[0].finish_reason == "length"


def test_metrics_and_info_show_the_acceptance(served: Served) -> None:
    assert httpx.get(f"{served.url}/info").json()["speculate"] == S
    assert metric(served, "lorax_speculative_tokens") == S
    lorax.Client(served.url).generate("hi", max_new_tokens=12)
    decode_rows = sent(served)[1:]  # after the first token
    assert metric(served, "lorax_decode_rows_total") == len(decode_rows)
    assert metric(served, "lorax_decode_tokens_total") == 11
    assert metric(served, "lorax_decode_accepted_tokens_per_step") == pytest.approx(11 / len(decode_rows))
