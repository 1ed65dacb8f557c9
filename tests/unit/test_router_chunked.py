"""The router's chunked scheduling and prefix cache against fake shards on real unix sockets.

`ChunkedShard` extends test_router_fakes.FakeShard with LoRAX's chunked-prefill contract
(spec/chunked-prefix.md): a Prefill may carry `cached_batch` (one forward: the running batch's next
step + the new requests' first chunks), `chunk_len` cuts a prompt, later chunks are sized by the shard
from Warmup's max_prefill_tokens minus one per other request, Decode continues unfinished chunks, a
request still prefilling gets no Generation, and `current_tokens` is the next forward's token count.
It records every forward so the tests can check what the router made the shards compute.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from test_router_fakes import FakeRequest, FakeShard, token_for

from router_client.messages import RouterConfig
from router_client.requests import RequestError
from router_client.router import Router
from worker.pb import generate_pb2 as pb
from worker.pb import generate_pb2_grpc as pb_grpc

BUDGET = 16
CONFIG = dict(
    max_input_length=40,
    max_total_tokens=64,
    max_batch_prefill_tokens=BUDGET,
    max_batch_size=8,
    call_timeout_s=10,
    connect_timeout_s=10,
    seq_length=24,  # prompts of 25..48 tokens have NTK alpha 3
    prefix_log_interval_s=0,
)
LONG = "abcdefghij" * 4  # 40 tokens with CharTokenizer


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]


@dataclass
class ChunkRequest(FakeRequest):
    prompt_len: int = 0
    computed: int = 0  # prompt tokens whose K/V exist
    next_chunk: int = 0  # prompt tokens the next forward computes (while prefilling)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len


@dataclass
class Forward:
    tokens: int  # tokens computed: chunks + one per decoding request (1 + speculate: its verify row)
    decoded: list[int]  # requests that got a decode token
    chunks: dict[int, int] = field(default_factory=dict)  # request id -> prompt tokens computed


class ChunkedShard(FakeShard):
    def __init__(self, *args: Any, chunked: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunked = chunked
        self.kv_dtype = "torch.float32"
        self.max_prefill = 0
        self.forwards: list[Forward] = []

    def Info(self, request: Any, context: Any) -> pb.InfoResponse:
        info = super().Info(request, context)
        info.chunked_prefill = self.chunked
        return info

    def Health(self, request: Any, context: Any) -> pb.HealthResponse:
        self.record("Health")
        stats = {"batches": len(self.batches), "kv_cache_dtype": self.kv_dtype}
        context.set_trailing_metadata((("x-qwen-worker-stats", json.dumps(stats)),))
        return pb.HealthResponse()

    def Warmup(self, request: Any, context: Any) -> pb.WarmupResponse:
        self.max_prefill = request.max_prefill_tokens
        return super().Warmup(request, context)

    def _forward(self, reqs: list[ChunkRequest]) -> list[pb.Generation]:
        fwd = Forward(0, [])
        emitting: list[FakeRequest] = []
        for r in reqs:
            if r.prefilling:
                fwd.chunks[r.id] = r.next_chunk
                fwd.tokens += r.next_chunk
                r.computed += r.next_chunk
                if not r.prefilling:
                    emitting.append(r)
            else:
                fwd.tokens += 1 + self.speculate  # the last token and its drafts: a verify row
                fwd.decoded.append(r.id)
                emitting.append(r)
        self.forwards.append(fwd)
        generations = self._step(emitting)
        left = [r for r in reqs if not r.finished]
        for r in left:
            if r.prefilling:
                r.next_chunk = min(r.prompt_len - r.computed, self.max_prefill - (len(left) - 1) * (1 + self.speculate))
        return generations

    def _reply(self, cls: Any, batch_id: int, reqs: list[ChunkRequest]) -> Any:
        resp = cls(generations=self._forward(reqs))
        left: list[Any] = [r for r in reqs if not r.finished]
        if left:
            self.batches[batch_id] = left
            resp.batch.CopyFrom(self._cached(batch_id, left))
        return resp

    def _cached(self, batch_id: int, reqs: list[Any]) -> pb.CachedBatch:
        current = sum(r.next_chunk if r.prefilling else 1 + self.speculate for r in reqs)
        return pb.CachedBatch(id=batch_id, request_ids=[r.id for r in reqs], size=len(reqs), current_tokens=current)

    def Prefill(self, request: Any, context: Any) -> pb.PrefillResponse:
        batch = request.batch
        self.record(
            "Prefill",
            batch_id=batch.id,
            request_ids=[r.id for r in batch.requests],
            blocks=[list(r.blocks) for r in batch.requests],
            slots=[list(r.slots) for r in batch.requests],
            cache_len=[r.cache_len for r in batch.requests],
            chunk_len=[r.chunk_len if r.HasField("chunk_len") else None for r in batch.requests],
            adapter_index=[r.adapter_index for r in batch.requests],
            cached=request.cached_batch.id if request.HasField("cached_batch") else None,
        )
        if any(r.inputs == self.fail_prefill_text for r in batch.requests):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")
        if any(r.inputs == "oom" for r in batch.requests):  # a failed forward: the cached batch stays as it was
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory")
        if any(r.HasField("chunk_len") for r in batch.requests) and not self.chunked:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no chunked prefill here")
        new = []
        for r in batch.requests:
            n = len(r.tokenized_inputs.ids)
            chunk = r.chunk_len if r.HasField("chunk_len") else n - r.cache_len
            new.append(ChunkRequest(r.id, r.stopping_parameters.max_new_tokens, 0, n, r.cache_len, chunk))
        if not request.HasField("cached_batch"):
            return self._reply(pb.PrefillResponse, batch.id, new)
        old = self.batches.pop(request.cached_batch.id)
        return self._reply(pb.PrefillResponse, request.cached_batch.id, [*old, *new])  # type: ignore[list-item]

    def Decode(self, request: Any, context: Any) -> pb.DecodeResponse:
        ids = [b.id for b in request.batches]
        self.record("Decode", batch_ids=ids)
        self.decode_gate.wait(timeout=10)
        reqs = [r for i in ids for r in self.batches.pop(i)]
        return self._reply(pb.DecodeResponse, ids[0], reqs)  # type: ignore[arg-type]

    def FilterBatch(self, request: Any, context: Any) -> pb.FilterBatchResponse:
        self.record("FilterBatch", batch_id=request.batch_id, request_ids=list(request.request_ids))
        by_id = {r.id: r for r in self.batches[request.batch_id]}
        reqs = [by_id[i] for i in request.request_ids]
        self.batches[request.batch_id] = reqs
        return pb.FilterBatchResponse(batch=self._cached(request.batch_id, reqs))


@contextlib.contextmanager
def serve_chunked(
    chunked: bool = True, kv_dtype: str = "torch.float32", speculate: int = 0
) -> Iterator[tuple[str, ChunkedShard]]:
    tmp = tempfile.mkdtemp(prefix="qc-", dir="/tmp")
    prefix = os.path.join(tmp, "fake")
    shard = ChunkedShard(block_size=4, total_tokens=160, chunked=chunked, speculate=speculate)
    shard.kv_dtype = kv_dtype
    shard.urls = [f"unix://{prefix}-0"]
    pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-shard-chunked")
    server = grpc.server(pool)
    pb_grpc.add_LoraxServiceServicer_to_server(shard, server)
    server.add_insecure_port(shard.urls[0])
    server.start()
    try:
        yield prefix, shard
    finally:
        shard.decode_gate.set()
        server.stop(grace=None).wait()
        pool.shutdown(wait=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{prefix}-0")
        os.rmdir(tmp)


@pytest.fixture
def served() -> Iterator[tuple[Router, ChunkedShard]]:
    with serve_chunked() as (prefix, shard), connect(prefix) as router:
        yield router, shard


def connect(prefix: str, **overrides: Any) -> Router:
    return Router.connect(f"{prefix}-0", tokenizer=CharTokenizer(), config=RouterConfig(**{**CONFIG, **overrides}))


def expected(request_id: int, n: int) -> list[int]:
    return [token_for(request_id, s) for s in range(n)]


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.002)):
        if cond():
            return
        done.wait(0.002)
    raise AssertionError("condition not reached in time")


def assert_no_leak(router: Router) -> None:
    """Every block is free or cached and unused; evicting the cache gives the allocator all back."""
    state = router.debug_state()
    assert state["used_blocks"] == 0 and state["free_blocks"] == state["usable_blocks"] and not state["in_flight"]
    router.clear_prefix_cache()
    state = router.debug_state()
    assert state["allocator_free_blocks"] == state["usable_blocks"] and state["cached_blocks"] == 0


# ------------------------------------------------------------------------------ chunked scheduling


def test_a_long_prompt_is_split_into_chunks_that_fit_the_budget(served: tuple[Router, ChunkedShard]) -> None:
    router, shard = served
    res = router.generate(LONG, timeout=10, stopping=dict(max_new_tokens=3))
    assert res.token_ids == expected(res.request_id, 3)
    (prefill,) = shard.of("Prefill")
    assert prefill["chunk_len"] == [BUDGET] and prefill["cache_len"] == [0] and prefill["cached"] is None
    assert [f.chunks for f in shard.forwards[:3]] == [{0: 16}, {0: 16}, {0: 8}]  # later chunks: the shard's
    assert all(f.tokens <= BUDGET for f in shard.forwards)
    assert len(shard.forwards) == 3 + 2  # three chunks (the first token with the last), two decodes
    assert_no_leak(router)


def test_decode_rows_advance_in_every_step_and_admission_uses_current_tokens(
    served: tuple[Router, ChunkedShard],
) -> None:
    router, shard = served
    shard.decode_gate.clear()
    a = router.submit("short", stopping=dict(max_new_tokens=12))
    wait_for(lambda: shard.of("Decode"))  # a's Prefill done, its first Decode held
    b = router.submit(LONG, stopping=dict(max_new_tokens=2))
    wait_for(lambda: router.debug_state()["queued"] == [b.request_id])
    shard.decode_gate.set()
    assert a.result(10).token_ids == expected(a.request_id, 12)
    assert b.result(10).token_ids == expected(b.request_id, 2)
    joined = shard.of("Prefill")[1]
    assert joined["request_ids"] == [b.request_id] and joined["cached"] == shard.of("Prefill")[0]["batch_id"]
    assert joined["chunk_len"] == [BUDGET - 1]  # the budget less a's decode row (current_tokens 1)
    # forward 0 prefilled a; 1..11 are a's decodes, and 2..4 also carry b's chunks (the later two sized by the shard)
    assert all(a.request_id in f.decoded for f in shard.forwards[1:12])
    assert [f.chunks.get(b.request_id) for f in shard.forwards[1:6]] == [None, 15, 15, 10, None]
    assert all(f.tokens <= BUDGET for f in shard.forwards)
    assert_no_leak(router)


def test_without_chunking_whole_prompts_are_prefilled_alone() -> None:
    with serve_chunked(chunked=False) as (prefix, shard):
        with pytest.raises(ValueError, match="max_batch_prefill_tokens"):
            connect(prefix)  # a 40-token prompt cannot fit one forward of 16
        with connect(prefix, max_input_length=16) as router:
            res = router.generate(LONG[:16], timeout=10, stopping=dict(max_new_tokens=2))
            assert res.token_ids == expected(res.request_id, 2)
            (prefill,) = shard.of("Prefill")
            assert prefill["chunk_len"] == [None] and prefill["cached"] is None
    with serve_chunked() as (prefix, shard), connect(prefix, chunked_prefill=False, max_input_length=16) as router:
        router.generate(LONG[:16], timeout=10, stopping=dict(max_new_tokens=2))
        assert [p["chunk_len"] for p in shard.of("Prefill")] == [[None]]  # the config said no


def test_a_request_cancelled_while_chunking_leaves_nothing_in_the_cache(served: tuple[Router, ChunkedShard]) -> None:
    router, shard = served
    shard.decode_gate.clear()
    b = router.submit(LONG, stopping=dict(max_new_tokens=4))
    wait_for(lambda: shard.of("Decode"))  # first chunk done, the second one held
    router.cancel(b.request_id)
    shard.decode_gate.set()
    with pytest.raises(RequestError) as err:
        b.result(10)
    assert err.value.code == "CANCELLED"
    assert router.debug_state()["cached_blocks"] == 0  # 32 of 40 tokens computed: no block was cached
    again = router.generate(LONG, timeout=10, stopping=dict(max_new_tokens=1))
    assert again.token_ids == expected(again.request_id, 1) and shard.of("Prefill")[-1]["cache_len"] == [0]
    assert_no_leak(router)


def test_a_request_cancelled_mid_chunks_is_filtered_out_and_the_batch_goes_on(
    served: tuple[Router, ChunkedShard],
) -> None:
    router, shard = served
    shard.decode_gate.clear()
    a = router.submit("short", stopping=dict(max_new_tokens=10))
    wait_for(lambda: shard.of("Decode"))
    b = router.submit(LONG, stopping=dict(max_new_tokens=2))
    wait_for(lambda: router.debug_state()["queued"] == [b.request_id])
    router.step_observer = lambda step: router.cancel(b.request_id) if step.method == "prefill" else None
    shard.decode_gate.set()
    with pytest.raises(RequestError) as err:
        b.result(10)
    assert err.value.code == "CANCELLED"
    assert a.result(10).token_ids == expected(a.request_id, 10)
    (kept,) = shard.of("FilterBatch")
    assert kept["request_ids"] == [a.request_id]  # b left a's batch after its first chunk
    assert [f.chunks for f in shard.forwards if b.request_id in f.chunks] == [{b.request_id: 15}]
    assert router.debug_state()["cached_blocks"] == 1  # a's block only: b's were never computed
    assert_no_leak(router)


@pytest.mark.parametrize("bad_text, code", [("fail me", "INVALID_ARGUMENT"), ("oom", "RESOURCE_EXHAUSTED")])
def test_a_refused_or_failed_request_fails_alone_and_the_running_batch_goes_on(
    served: tuple[Router, ChunkedShard], bad_text: str, code: str
) -> None:
    router, shard = served
    shard.decode_gate.clear()
    a = router.submit("short", stopping=dict(max_new_tokens=8))
    wait_for(lambda: shard.of("Decode"))
    bad, good = router.submit(bad_text), router.submit("fine", stopping=dict(max_new_tokens=2))
    wait_for(lambda: router.debug_state()["queued"] == [bad.request_id, good.request_id])
    shard.decode_gate.set()
    with pytest.raises(RequestError) as err:
        bad.result(10)
    assert err.value.code == code and err.value.at_prefill
    assert a.result(10).token_ids == expected(a.request_id, 8)
    prefills = [p["request_ids"] for p in shard.of("Prefill")[1:]]
    if code == "INVALID_ARGUMENT":  # retried one request at a time: only the refused one fails
        assert good.result(10).token_ids == expected(good.request_id, 2)
        assert prefills == [[bad.request_id, good.request_id], [bad.request_id], [good.request_id]]
    else:  # the new batch failed as a whole
        with pytest.raises(RequestError, match="RESOURCE_EXHAUSTED"):
            good.result(10)
        assert prefills == [[bad.request_id, good.request_id]]
    assert router.debug_state()["cached_blocks"] == 1 + (code == "INVALID_ARGUMENT")  # a's and good's blocks
    assert_no_leak(router)


# ------------------------------------------------------------------------------ prefix cache


def test_a_shared_prefix_is_reused_from_the_first_requests_blocks(served: tuple[Router, ChunkedShard]) -> None:
    router, shard = served
    first = router.generate(LONG, timeout=10, stopping=dict(max_new_tokens=2))
    second = router.generate(LONG[:36] + "wxyz", timeout=10, stopping=dict(max_new_tokens=2))
    same = router.generate(LONG, timeout=10, stopping=dict(max_new_tokens=2))
    assert second.token_ids == expected(second.request_id, 2) and same.token_ids == expected(same.request_id, 2)
    p1, p2, p3 = shard.of("Prefill")
    assert p2["cache_len"] == [36] and p2["chunk_len"] == [None]  # 4 tokens left: within the budget
    assert p2["blocks"][0][:9] == p1["blocks"][0][:9] and p2["blocks"][0][9] not in p1["blocks"][0]
    assert len(p2["blocks"][0]) == 11  # blocks cover the whole sequence: 40 + 2 - 1 tokens
    slots = [b * 4 + r for b in p2["blocks"][0] for r in range(4)][:41]
    assert p2["slots"][0] == slots  # from the block list, not first_slot + arange
    assert p3["cache_len"] == [36]  # the whole prompt cached: its last block is computed again
    assert shard.forwards[-2].chunks == {same.request_id: 4} and first.request_id != same.request_id
    load = router.load()
    assert (load.prefix_lookups, load.prefix_hits, load.prefix_hit_tokens) == (3, 2, 72)
    assert_no_leak(router)


def test_prefixes_are_not_shared_across_adapters_alpha_buckets_or_with_prefill_logprobs(
    served: tuple[Router, ChunkedShard],
) -> None:
    router, shard = served
    index = router.load_adapter("some/adapter")
    router.generate(LONG, timeout=10, stopping=dict(max_new_tokens=1))  # alpha 3, base model
    router.generate(LONG, timeout=10, stopping=dict(max_new_tokens=1), adapter_index=index)
    router.generate(LONG[:24], timeout=10, stopping=dict(max_new_tokens=1))  # same 6 blocks but alpha 1
    router.generate(LONG[:36] + "!", timeout=10, stopping=dict(max_new_tokens=1), prefill_logprobs=True)
    router.generate(LONG[:36] + "?", timeout=10, stopping=dict(max_new_tokens=1), adapter_index=index)
    assert [p["cache_len"] for p in shard.of("Prefill")] == [[0], [0], [0], [0], [36]]
    assert_no_leak(router)


@pytest.mark.parametrize(
    "overrides, kv_dtype",
    [
        (dict(prefix_caching=False), "torch.float32"),
        (dict(seq_length=None), "torch.float32"),  # NTK alpha keys unknown
        ({}, "torch.float8_e4m3fn"),  # a shard that says its KV cache is fp8 (Health stats)
    ],
)
def test_the_prefix_cache_is_off_when_disabled_or_unsafe(overrides: dict[str, Any], kv_dtype: str) -> None:
    with serve_chunked(kv_dtype=kv_dtype) as (prefix, shard), connect(prefix, **overrides) as router:
        for _ in range(2):
            router.generate(LONG, timeout=10, stopping=dict(max_new_tokens=1))
        assert [p["cache_len"] for p in shard.of("Prefill")] == [[0], [0]]
        assert router.debug_state()["cached_blocks"] == 0 and router.load().prefix_lookups == 0


def test_the_hit_rate_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with serve_chunked() as (prefix, _), connect(prefix, prefix_log_interval_s=1e-9) as router:
        with caplog.at_level("INFO", logger="router_client.kv"):
            for _ in range(2):
                router.generate(LONG, timeout=10, stopping=dict(max_new_tokens=2))
    lines = [r.getMessage() for r in caplog.records if r.name == "router_client.kv"]
    assert any(
        line.startswith("prefix cache: 45.0% of prompt tokens reused (36/80), 1/2 requests hit") for line in lines
    )


# ------------------------------------------------------------------------------ CLI and metrics


def test_cli_flags_and_model_facts_reach_the_router_config(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from router_client import cli

    seen: list[RouterConfig] = []
    monkeypatch.setattr(Router, "connect", classmethod(lambda cls, path, tokenizer, config: seen.append(config)))
    monkeypatch.setattr("worker.tokenizer.QwenTokenizer.from_dir", lambda path: CharTokenizer())
    (tmp_path / "config.json").write_text('{"n_embd": 8, "seq_length": 300}')  # v1.0 spelling: NTK off
    base = ["--uds-path", "p", "--model-dir", str(tmp_path)]
    cli._start_router(cli.build_parser().parse_args(["serve", *base]))
    cli._start_router(cli.build_parser().parse_args(["generate", *base, "x", "--no-prefix-caching"]))
    cli._start_router(cli.build_parser().parse_args(["load", *base, "--no-chunked-prefill"]))
    assert [(c.prefix_caching, c.chunked_prefill) for c in seen] == [(True, True), (False, True), (True, False)]
    assert {(c.seq_length, c.use_dynamic_ntk) for c in seen} == {(300, False)}


def test_metrics_export_the_prefix_cache_hit_rate() -> None:
    from router_client.front.metrics import Metrics
    from router_client.messages import RouterLoad

    load = RouterLoad(0, 0, 0, 0, 0, 10, 0, 0, 7, 4, 3, 400, 100)
    text = Metrics(lambda: load, lambda: 0).render().decode()
    assert "lorax_prefix_cache_hit_rate 0.25" in text and "lorax_prefix_cache_blocks 7.0" in text
    assert "lorax_prefix_cache_lookups_total 4.0" in text and "lorax_prefix_cache_hit_tokens_total 100.0" in text
