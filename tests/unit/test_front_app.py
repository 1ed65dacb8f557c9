"""The HTTP front in-process (uvicorn on a loopback port) over fake shards on real unix sockets:
response shapes, the concurrency limit, the API key, the body limit, JSON errors, metrics, and a
client that disconnects mid-stream (its request is cancelled and its KV blocks come back)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from test_router_fakes import FakeShard, serve_fakes, token_for

from router_client.front.app import create_app
from router_client.front.service import Front, FrontConfig
from router_client.messages import RouterConfig
from router_client.router import Router

CONFIG = RouterConfig(
    max_input_length=32,
    max_total_tokens=64,
    max_batch_prefill_tokens=64,
    max_batch_size=8,
    call_timeout_s=10,
    connect_timeout_s=10,
)


class ByteTokenizer:
    """Bytes are ids 0..255; <|endoftext|>, <|im_start|>, <|im_end|> are 256, 257, 258."""

    special_tokens = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    im_start_id, im_end_id, n_real_vocab = 257, 258, 259

    def encode(self, text: str, allowed_special: object = "all") -> list[int]:
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)  # type: ignore
        ids: list[int] = []
        while text:
            hits = [(text.find(s), s) for s in allowed if s in text]
            at, name = min(hits) if hits else (len(text), "")
            ids += list(text[:at].encode())
            if name:
                ids.append(self.special_tokens[name])
            text = text[at + len(name) :]
        return ids

    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes:
        names = {v: k for k, v in self.special_tokens.items()}
        return b"".join(
            names[i].encode() if i in names else bytes([i]) for i in ids if not (skip_special_tokens and i in names)
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")


@dataclass
class Served:
    url: str
    router: Router
    shard: FakeShard
    front: Front


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def front_on_fakes(front_config: dict[str, Any], **shard_kwargs: Any) -> Iterator[Served]:
    """The front (FrontConfig fields `front_config`) in-process on one fake shard (FakeShard keywords)."""
    with serve_fakes(world=1, total_tokens=256, **shard_kwargs) as (prefix, (shard,)):
        with Router.connect(f"{prefix}-0", tokenizer=ByteTokenizer(), config=CONFIG) as router:
            front = Front(router, ByteTokenizer(), FrontConfig(model_id="fake", **front_config))
            port = free_port()
            server = uvicorn.Server(uvicorn.Config(create_app(front), host="127.0.0.1", port=port, log_level="warning"))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            deadline = time.monotonic() + 10
            while not server.started:
                assert time.monotonic() < deadline and thread.is_alive(), "the front did not start"
                time.sleep(0.01)
            try:
                yield Served(f"http://127.0.0.1:{port}", router, shard, front)
            finally:
                shard.decode_gate.set()
                server.should_exit = True
                thread.join(timeout=10)


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """The front on fake shards; `@pytest.mark.parametrize("served", [{...FrontConfig fields}], indirect=True)`."""
    with front_on_fakes(getattr(request, "param", {})) as s:
        yield s


def wait_until(cond: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError("condition not reached in time")


def test_generate_shapes(served: Served) -> None:
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 3, "details": True, "decoder_input_details": None}}
    one = httpx.post(f"{served.url}/generate", json=body).json()
    tokens = [token_for(0, s) for s in range(3)]
    assert one["generated_text"] == "".join(f"<{t}>" for t in tokens)
    d = one["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 3 and d["prompt_tokens"] == 2
    assert [t["id"] for t in d["tokens"]] == tokens and d["prefill"] == [] and d["seed"] is None
    listed = httpx.post(f"{served.url}/", json=body).json()  # LoRAX's `/`: a one-element list
    assert isinstance(listed, list) and len(listed) == 1 and listed[0]["details"]["generated_tokens"] == 3
    events = [
        json.loads(line[5:])
        for line in httpx.post(f"{served.url}/generate_stream", json=body).text.splitlines()
        if line.startswith("data:")
    ]
    assert [e["token"]["id"] for e in events] == [token_for(2, s) for s in range(3)]
    assert [e["generated_text"] for e in events[:-1]] == [None, None] and events[-1]["generated_text"]
    assert events[-1]["details"]["finish_reason"] == "length"


def test_a_client_that_disconnects_mid_stream_cancels_its_request(served: Served) -> None:
    served.shard.decode_gate.clear()  # decoding waits: the request stays in flight
    body = {"inputs": "long", "parameters": {"max_new_tokens": 40}}
    with httpx.Client() as client, client.stream("POST", f"{served.url}/generate_stream", json=body) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data:"))
        assert json.loads(first[5:])["token"]["id"] == token_for(0, 0)
        assert served.router.debug_state()["used_blocks"] > 0
    served.shard.decode_gate.set()  # the client is gone; the router drops the request after this step
    wait_until(lambda: served.router.debug_state()["used_blocks"] == 0 and not served.shard.batches)
    assert len(served.shard.of("Decode")) < 39  # it did not run to the end
    assert served.front.active == 0
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'lorax_request_failure{err="cancelled"} 1' in metrics


@pytest.mark.parametrize("served", [{"max_concurrent_requests": 1}], indirect=True)
def test_concurrency_limit_answers_429(served: Served) -> None:
    served.shard.decode_gate.clear()
    body = {"inputs": "a", "parameters": {"max_new_tokens": 3}}
    first: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: first.append(httpx.post(f"{served.url}/generate", json=body, timeout=10)))
    thread.start()
    wait_until(lambda: served.front.active == 1)
    second = httpx.post(f"{served.url}/generate", json=body)
    assert second.status_code == 429 and second.json()["error_type"] == "overloaded"
    served.shard.decode_gate.set()
    thread.join(timeout=10)
    assert first[0].status_code == 200
    assert httpx.post(f"{served.url}/generate", json=body).status_code == 200  # the slot came back


@pytest.mark.parametrize("served", [{"api_key": "sekret", "max_body_bytes": 1000}], indirect=True)
def test_api_key_and_body_limit(served: Served) -> None:
    body = {"inputs": "a", "parameters": {"max_new_tokens": 1}}
    missing = httpx.post(f"{served.url}/generate", json=body)
    assert missing.status_code == 401 and missing.json()["error_type"] == "authentication"
    assert httpx.post(f"{served.url}/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = {"Authorization": "Bearer sekret"}
    assert httpx.post(f"{served.url}/generate", json=body, headers=ok).status_code == 200
    assert httpx.get(f"{served.url}/metrics").status_code == 401
    assert httpx.get(f"{served.url}/health").status_code == 200  # probes need no key
    big = {"inputs": "a" * 2000}
    too_big = httpx.post(f"{served.url}/generate", json=big, headers=ok)
    assert too_big.status_code == 413 and too_big.json()["error_type"] == "validation"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield json.dumps(big).encode()

    chunked = httpx.post(f"{served.url}/generate", content=chunks(), headers={**ok, "content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error_type"] == "validation"


@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"inputs": "x",', "malformed JSON"),
        (b'{"inputs": 5}', "inputs"),
        (b'{"inputs": ""}', "inputs"),
        (b'{"inputs": "x", "parameters": {"temperature": "0.5"}}', "temperature"),
        (b'{"inputs": "x", "parameters": {"top_p": 1.5}}', "top_p"),
        (b'{"inputs": "x", "parameters": {"max_new_tokens": 500}}', "max_total_tokens"),
        (b'{"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}', "stop"),
        (b'{"inputs": "x", "parameters": {"best_of": 2}}', "best_of"),
        (b'{"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}', "regex"),
        (b'{"inputs": "x", "parameters": {"response_format": {"type": "json_schema"}}}', "schema"),
        (b"[1, 2]", "dictionary"),
        (b'{"inputs": "fail me"}', "boom"),  # the fake shard refuses this prompt at Prefill
    ],
)
def test_invalid_requests_get_422_json(served: Served, body: bytes, needle: str) -> None:
    r = httpx.post(f"{served.url}/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and needle in r.json()["error"], r.json()
    assert served.router.debug_state()["used_blocks"] == 0


def test_unknown_routes_and_methods_answer_json(served: Served) -> None:
    r = httpx.get(f"{served.url}/nope")
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"
    r = httpx.get(f"{served.url}/generate")
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed"


def test_metrics_keep_lorax_names_and_move(served: Served) -> None:
    def sample(text: str, name: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].split()[1]) if lines else 0.0

    before = httpx.get(f"{served.url}/metrics").text
    assert "# TYPE lorax_request_count counter" in before and "lorax_request_count_total" not in before
    httpx.post(f"{served.url}/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 4}})
    httpx.post(f"{served.url}/generate", json={"inputs": "abc", "parameters": {"top_p": 7}})
    after = httpx.get(f"{served.url}/metrics").text
    assert sample(after, "lorax_request_count") == sample(before, "lorax_request_count") + 2
    assert sample(after, "lorax_request_success") == sample(before, "lorax_request_success") + 1
    assert 'lorax_request_failure{err="validation"} 1' in after
    assert sample(after, "lorax_request_generated_tokens_sum") == 4
    assert sample(after, "lorax_request_input_length_sum") == 3
    assert sample(after, "lorax_request_time_to_first_token_duration_count") == 1
    assert 'lorax_batch_inference_duration_count{method="decode"} 3.0' in after
    assert 'lorax_adapter_request_count{adapter=""} 1' in after
    for gauge in (
        "lorax_kv_blocks_free",
        "lorax_kv_blocks_used",
        "lorax_queue_length",
        "lorax_batch_current_size",
        "lorax_adapters_loaded",
        "lorax_adapters_offloaded",
    ):
        assert f"\n{gauge} " in after
    assert sample(after, "lorax_kv_blocks_free") == served.router.debug_state()["usable_blocks"]


def test_best_of_and_n_run_several_sequences(served: Served) -> None:
    body = {"inputs": "ab", "parameters": {"max_new_tokens": 2, "best_of": 3, "do_sample": True, "details": True}}
    res = httpx.post(f"{served.url}/generate", json=body).json()
    assert len(served.shard.of("Prefill")[-1]["request_ids"]) == 3  # one batch of three sequences
    others = res["details"]["best_of_sequences"]
    assert len(others) == 2 and all(len(s["tokens"]) == 2 for s in others)
    texts = {res["generated_text"], *(s["generated_text"] for s in others)}
    assert len(texts) == 3  # the fake shard gives each request its own tokens: three distinct sequences
    stream = {**body, "stream": True}
    assert httpx.post(f"{served.url}/", json=stream).status_code == 422  # best_of > 1 cannot stream
    chat = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={
            "model": "",
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
            "n": 2,
            "max_tokens": 3,
        },  # a short system turn: the ChatML prompt fits max_input_length 32
    )
    assert [c["index"] for c in chat.json()["choices"]] == [0, 1] and chat.json()["usage"]["completion_tokens"] == 6
    too_many = httpx.post(f"{served.url}/v1/completions", json={"model": "", "prompt": "x", "n": 5})
    assert too_many.status_code == 422 and "n and best_of" in too_many.json()["error"]


def test_structured_output_reaches_the_shard_as_the_schema_field(served: Served) -> None:
    sent = []
    prefill = served.router.client.prefill

    def spy(batch: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(batch.requests[0].parameters)
        return prefill(batch, *args, **kwargs)

    served.router.client.prefill = spy  # type: ignore[method-assign]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    lorax = {
        "inputs": "x",
        "parameters": {"max_new_tokens": 1, "response_format": {"type": "json_object", "schema": schema}},
    }
    tgi = {"inputs": "x", "parameters": {"max_new_tokens": 1, "grammar": {"type": "json", "value": schema}}}
    oai = {
        "model": "",
        "prompt": "x",
        "max_tokens": 1,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    plain = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
    for route, body in (("/generate", lorax), ("/generate", tgi), ("/v1/completions", oai), ("/generate", plain)):
        assert httpx.post(f"{served.url}{route}", json=body).status_code == 200
    assert [p.schema if p.HasField("schema") else None for p in sent] == [
        json.dumps(schema, separators=(",", ":"))
    ] * 3 + [None]


def test_health_answers_503_when_generation_fails(served: Served) -> None:
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    served.shard.fail_prefill_text = "liveness"  # the probe's one-token Prefill now fails
    r = httpx.get(f"{served.url}/health")
    assert r.status_code == 503 and r.json()["error_type"] == "unhealthy"
