"""An in-process fake LoraxService shard that records every call, for the router tests.

Generation rule: request `r`'s s-th generated token is id (r + s) % 50 with text f"<{id}>"; it finishes
with FINISH_REASON_LENGTH at max_new_tokens, or FINISH_REASON_STOP_SEQUENCE once its text contains one
of its stop sequences. With `speculate` S (Info.speculate), the k-th Decode of request r accepts
`accepted(r, k, S)` = 1 + (r + k) % (S + 1) of those tokens at once, checked one by one in order (the rest
of a step is dropped at a stop), and GeneratedText.skipped_tokens counts each step's tokens beyond its
first. Shard `rank` of `world` answers generations only for `r % world == rank`, like a real shard.
Batches are kept per id; Decode concatenates the listed batches under the first id, as the contract says.
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

from worker.pb import generate_pb2 as pb
from worker.pb import generate_pb2_grpc as pb_grpc


@dataclass
class FakeRequest:
    id: int
    max_new_tokens: int
    generated: int = 0
    stop_sequences: tuple[str, ...] = field(default=(), kw_only=True)
    steps: int = field(default=0, kw_only=True)  # Prefill and Decode steps that gave it tokens
    skipped: int = field(default=0, kw_only=True)
    text: str = field(default="", kw_only=True)
    reason: int | None = field(default=None, kw_only=True)  # its FinishReason once finished

    @property
    def finished(self) -> bool:
        return self.reason is not None


def token_for(request_id: int, step: int) -> int:
    return (request_id + step) % 50


def accepted(request_id: int, decode_step: int, speculate: int) -> int:
    """Tokens the fake accepts for a request at its `decode_step`-th Decode (from 1)."""
    return 1 + (request_id + decode_step) % (speculate + 1)


class FakeShard(pb_grpc.LoraxServiceServicer):
    """Records `(method, fields)` in `calls`; knobs: `fail_prefill_text` (a Prefill containing a
    request whose inputs equal it aborts INVALID_ARGUMENT), `decode_gate` (Decode waits on it),
    `return_finished_batch` (answer the batch even when every request finished)."""

    def __init__(
        self,
        rank: int = 0,
        world: int = 1,
        block_size: int = 4,
        total_tokens: int = 64,
        requires_block_allocator: bool = True,
        speculate: int = 0,
    ) -> None:
        self.rank, self.world = rank, world
        self.speculate = speculate
        self.urls: list[str] = []
        self.block_size = block_size
        self.total_tokens = total_tokens
        self.requires_block_allocator = requires_block_allocator
        self.fail_prefill_text: str | None = "fail me"
        self.decode_gate = threading.Event()
        self.decode_gate.set()
        self.return_finished_batch = False
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.sent: list[tuple[int, list[int]]] = []  # (request id, token ids) of every Generation answered
        self.batches: dict[int, list[FakeRequest]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ helpers

    def record(self, method: str, **fields: Any) -> None:
        with self._lock:
            self.calls.append((method, fields))

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.calls]

    def of(self, method: str) -> list[dict[str, Any]]:
        with self._lock:
            return [fields for name, fields in self.calls if name == method]

    def _advance(self, r: FakeRequest) -> list[int]:
        """The tokens `r` accepts in this step, checked for stops one by one (see the module docstring)."""
        n = accepted(r.id, r.steps, self.speculate) if r.steps else 1
        r.steps += 1
        tokens: list[int] = []
        while len(tokens) < n and not r.finished:
            tokens.append(token_for(r.id, r.generated))
            r.generated += 1
            r.text += f"<{tokens[-1]}>"
            if any(s in r.text for s in r.stop_sequences):
                r.reason = pb.FINISH_REASON_STOP_SEQUENCE
            elif r.generated >= r.max_new_tokens:
                r.reason = pb.FINISH_REASON_LENGTH
        r.skipped += len(tokens) - 1
        return tokens

    def _step(self, reqs: list[FakeRequest]) -> list[pb.Generation]:
        out = []
        for r in reqs:
            tokens = self._advance(r)
            if r.id % self.world != self.rank:
                continue
            nt = pb.NextTokens(
                ids=tokens,
                logprobs=[-0.5] * len(tokens),
                texts=[f"<{t}>" for t in tokens],
                is_special=[False] * len(tokens),
            )
            gen = pb.Generation(request_id=r.id, next_tokens=nt)
            with self._lock:
                self.sent.append((r.id, tokens))
            if r.finished:
                gen.generated_text.CopyFrom(
                    pb.GeneratedText(
                        text=r.text, generated_tokens=r.generated, skipped_tokens=r.skipped, finish_reason=r.reason
                    )
                )
            out.append(gen)
        return out

    def _answer(self, cls: Any, batch_id: int, reqs: list[FakeRequest]) -> Any:
        generations = self._step(reqs)
        resp = cls(generations=generations)
        if all(r.finished for r in reqs) and not self.return_finished_batch:
            return resp
        self.batches[batch_id] = reqs
        resp.batch.CopyFrom(
            pb.CachedBatch(
                id=batch_id,
                request_ids=[r.id for r in reqs],
                size=len(reqs),
                max_tokens=len(reqs) * 8,
                current_tokens=len(reqs),
            )
        )
        return resp

    # ------------------------------------------------------------------ RPCs

    def ServiceDiscovery(self, request: Any, context: Any) -> pb.ServiceDiscoveryResponse:
        self.record("ServiceDiscovery")
        return pb.ServiceDiscoveryResponse(urls=self.urls)

    def ClearCache(self, request: Any, context: Any) -> pb.ClearCacheResponse:
        batch_id = request.id if request.HasField("id") else None
        self.record("ClearCache", id=batch_id)
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)
        return pb.ClearCacheResponse()

    def Info(self, request: Any, context: Any) -> pb.InfoResponse:
        self.record("Info")
        return pb.InfoResponse(
            dtype="float32",
            device_type="cpu",
            block_size=self.block_size,
            supports_generation=True,
            requires_block_allocator=self.requires_block_allocator,
            speculate=self.speculate,
        )

    def Warmup(self, request: Any, context: Any) -> pb.WarmupResponse:
        self.record(
            "Warmup",
            requests=list(request.batch.requests),
            max_input_length=request.max_input_length,
            max_prefill_tokens=request.max_prefill_tokens,
            max_new_tokens=request.max_new_tokens,
        )
        return pb.WarmupResponse(max_supported_total_tokens=self.total_tokens)

    def Prefill(self, request: Any, context: Any) -> pb.PrefillResponse:
        batch = request.batch
        self.record(
            "Prefill",
            batch_id=batch.id,
            request_ids=[r.id for r in batch.requests],
            blocks=[list(r.blocks) for r in batch.requests],
            slots=[list(r.slots) for r in batch.requests],
            ids=[list(r.tokenized_inputs.ids) for r in batch.requests],
            max_new_tokens=[r.stopping_parameters.max_new_tokens for r in batch.requests],
            adapter_index=[r.adapter_index for r in batch.requests],
            cached=request.HasField("cached_batch"),
        )
        if self.fail_prefill_text is not None and any(r.inputs == self.fail_prefill_text for r in batch.requests):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"boom on shard {self.rank}")
        if batch.id in self.batches:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {batch.id} already live")
        reqs = [
            FakeRequest(
                r.id, r.stopping_parameters.max_new_tokens, stop_sequences=tuple(r.stopping_parameters.stop_sequences)
            )
            for r in batch.requests
        ]
        return self._answer(pb.PrefillResponse, batch.id, reqs)

    def Decode(self, request: Any, context: Any) -> pb.DecodeResponse:
        ids = [b.id for b in request.batches]
        self.record("Decode", batch_ids=ids, request_ids=[list(b.request_ids) for b in request.batches])
        self.decode_gate.wait(timeout=10)
        missing = [i for i in ids if i not in self.batches]
        if missing:
            context.abort(grpc.StatusCode.NOT_FOUND, f"batches {missing} unknown")
        reqs = [r for i in ids for r in self.batches.pop(i)]
        if any(r.finished for r in reqs):  # the router must filter finished requests out first
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "decode of a finished request")
        return self._answer(pb.DecodeResponse, ids[0], reqs)

    def FilterBatch(self, request: Any, context: Any) -> pb.FilterBatchResponse:
        self.record("FilterBatch", batch_id=request.batch_id, request_ids=list(request.request_ids))
        if request.batch_id not in self.batches:
            context.abort(grpc.StatusCode.NOT_FOUND, f"batch {request.batch_id} unknown")
        by_id = {r.id: r for r in self.batches[request.batch_id]}
        reqs = [by_id[i] for i in request.request_ids]
        self.batches[request.batch_id] = reqs
        return pb.FilterBatchResponse(
            batch=pb.CachedBatch(id=request.batch_id, request_ids=[r.id for r in reqs], size=len(reqs))
        )

    def Health(self, request: Any, context: Any) -> pb.HealthResponse:
        self.record("Health")
        context.set_trailing_metadata((("x-fake-stats", json.dumps({"batches": len(self.batches)})),))
        return pb.HealthResponse()

    def DownloadAdapter(self, request: Any, context: Any) -> pb.DownloadAdapterResponse:
        self.record("DownloadAdapter", ids=list(request.adapter_parameters.adapter_ids), source=request.adapter_source)
        return pb.DownloadAdapterResponse(downloaded=True, memory_fraction=0.25)

    def LoadAdapter(self, request: Any, context: Any) -> pb.LoadAdapterResponse:
        self.record("LoadAdapter", ids=list(request.adapter_parameters.adapter_ids), index=request.adapter_index)
        return pb.LoadAdapterResponse(loaded=True)

    def OffloadAdapter(self, request: Any, context: Any) -> pb.OffloadAdapterResponse:
        self.record("OffloadAdapter", ids=list(request.adapter_parameters.adapter_ids), index=request.adapter_index)
        return pb.OffloadAdapterResponse(offloaded=True)


@contextlib.contextmanager
def serve_fakes(world: int = 1, **kwargs: Any) -> Iterator[tuple[str, list[FakeShard]]]:
    """Start `world` fake shards on real unix sockets `{prefix}-{rank}`; yields (prefix, shards).
    On exit the servers, their thread pools and the socket files are gone."""
    tmp = tempfile.mkdtemp(prefix="qr-", dir="/tmp")  # short: unix socket paths are limited to ~107 bytes
    prefix = os.path.join(tmp, "fake")
    shards = [FakeShard(rank, world, **kwargs) for rank in range(world)]
    urls = [f"unix://{prefix}-{r}" for r in range(world)]
    servers = []
    try:
        for shard in shards:
            shard.urls = urls
            pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"fake-shard-{shard.rank}")
            server = grpc.server(pool)
            pb_grpc.add_LoraxServiceServicer_to_server(shard, server)
            server.add_insecure_port(urls[shard.rank])
            server.start()
            servers.append((server, pool))
        yield prefix, shards
    finally:
        for shard in shards:
            shard.decode_gate.set()
        for server, pool in servers:
            server.stop(grace=None).wait()
            pool.shutdown(wait=True)
        for r in range(world):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{prefix}-{r}")
        os.rmdir(tmp)


def test_fake_shard_generation_rule() -> None:
    shard = FakeShard()
    reqs = [FakeRequest(7, 2)]
    first, second = shard._step(reqs), shard._step(reqs)
    assert [g.next_tokens.ids[0] for g in first + second] == [7, 8]
    assert not first[0].HasField("generated_text")
    assert second[0].generated_text.finish_reason == pb.FINISH_REASON_LENGTH
