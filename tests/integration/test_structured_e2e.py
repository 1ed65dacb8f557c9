"""Structured output end to end: real shard processes (one, and two under tensor parallelism), `qwen-router
serve` as a process on a loopback port, the real lorax-client and openai clients and plain HTTP (TGI's
`grammar`). Every constrained output parses and validates against its schema; a bad schema is a 422 that
names the problem and the shard keeps serving; two shards give what one gives (every rank's matcher
advances on the same broadcast tokens)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import lorax
import openai
import pytest

from fronts import FrontProc, start_front, stop_front
from helpers import PERSON, POINT
from make_demo_model import BASE_TEXTS
from shards import start_launcher, stop


@pytest.fixture(scope="module")
def front(shard, demo_dir) -> Iterator[FrontProc]:
    f = start_front(shard, demo_dir)
    yield f
    assert stop_front(f) == 0, f.log()[-3000:]


def lorax_json(url: str, prompt: str, schema: dict, **kwargs: Any) -> tuple[Any, str]:
    res = lorax.Client(url).generate(
        prompt, max_new_tokens=120, details=True, response_format={"type": "json_object", "schema": schema}, **kwargs
    )
    return json.loads(res.generated_text), res.details.finish_reason.value


def test_lorax_client_response_format(front):
    for k, schema in enumerate((PERSON, POINT)):
        value, reason = lorax_json(front.url, BASE_TEXTS[k][0], schema)
        jsonschema.validate(value, schema)
        assert reason == "eos_token"
    value, _ = lorax_json(front.url, BASE_TEXTS[2][0], PERSON, do_sample=True, seed=5, temperature=1.3)
    jsonschema.validate(value, PERSON)


def test_lorax_client_stream_is_the_same_json(front):
    rf = {"type": "json_object", "schema": POINT}
    events = list(lorax.Client(front.url).generate_stream(BASE_TEXTS[1][0], max_new_tokens=60, response_format=rf))
    streamed = "".join(e.token.text for e in events if not e.token.special)
    assert json.loads(streamed) == lorax_json(front.url, BASE_TEXTS[1][0], POINT)[0]


def test_openai_chat_json_schema(front):
    oai = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
    res = oai.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "Describe a person."}],
        max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    content = res.choices[0].message.content
    assert content is not None and res.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), PERSON)


def test_tgi_grammar_and_json_object(front):
    body = {
        "inputs": BASE_TEXTS[3][0],
        "parameters": {"max_new_tokens": 60, "grammar": {"type": "json", "value": POINT}},
    }
    r = httpx.post(f"{front.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["generated_text"]), POINT)
    body = {"inputs": BASE_TEXTS[3][0], "parameters": {"max_new_tokens": 6, "response_format": {"type": "json_object"}}}
    r = httpx.post(f"{front.url}/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["generated_text"].lstrip().startswith("{"), r.text


def test_a_bad_schema_is_a_422_naming_it_and_the_shard_keeps_serving(front, shard_stats):
    with pytest.raises(lorax.errors.ValidationError, match="objekt"):
        lorax_json(front.url, "x", {"type": "objekt"})
    oai = openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as err:
        oai.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "x"}],
            max_tokens=4,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": "array", "uniqueItems": True}},
            },
        )
    assert "uniqueItems" in str(err.value.body)
    r = httpx.post(
        f"{front.url}/generate_stream",
        json={"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"$ref": "#/nowhere"}}}},
    )
    assert r.status_code == 422 and r.json()["error_type"] == "validation"  # before the stream started
    assert shard_stats()["batches"] == 0
    jsonschema.validate(lorax_json(front.url, BASE_TEXTS[0][0], POINT)[0], POINT)  # still serving


def test_two_shards_give_what_one_gives(front, demo_dir):
    """Request ids alternate, so rank 1 answers every other request: its matchers, stop checks and texts must
    follow rank 0's tokens exactly."""
    calls = [
        (BASE_TEXTS[k % len(BASE_TEXTS)][0], schema, params)
        for k, (schema, params) in enumerate(
            [(PERSON, {}), (POINT, {}), (PERSON, dict(do_sample=True, seed=3, temperature=1.2)), (POINT, {})]
        )
    ]
    one = [lorax_json(front.url, p, s, **kw) for p, s, kw in calls]
    two_shards = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"), num_shard=2)
    try:
        tp_front = start_front(two_shards, demo_dir)
        try:
            two = [lorax_json(tp_front.url, p, s, **kw) for p, s, kw in calls]
        finally:
            assert stop_front(tp_front) == 0
    finally:
        assert stop(two_shards) == 0, two_shards.log()[-3000:]
    assert two == one
