"""`ShardedClient`: one gRPC channel per shard, every call fanned out the way LoRAX's router does.

The router connects to shard 0 only, asks ServiceDiscovery for every shard's address, then sends
each later call to every shard concurrently (except DownloadAdapter: shard 0 only). Merge rules:
generation lists are concatenated in rank order (shard r answers only for `request.id % world == r`)
and the cached batch is shard 0's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from worker.pb import generate_pb2 as pb
from worker.pb import generate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
StepResult = tuple[list[pb.Generation], pb.CachedBatch | None]


class ShardError(RuntimeError):
    """A call failed on one shard; carries the shard's rank, address, method and gRPC status."""

    def __init__(self, rank: int, url: str, method: str, code: grpc.StatusCode | None, details: str) -> None:
        self.rank, self.url, self.method, self.code, self.details = rank, url, method, code, details
        status = code.name if code is not None else "ERROR"
        super().__init__(f"shard {rank} ({url}) {method} failed: {status}: {details}")


class ShardMismatchError(RuntimeError):
    """Shards disagree on a fact that must be identical everywhere (block size, dtype)."""


def grpc_target(address: str) -> str:
    """A gRPC target for a shard address: `/abs/path` → `unix:///abs/path`; `rel/path` → `unix:rel/path`;
    `unix:…` URLs and `host:port` targets are kept as they are."""
    if address.startswith("unix:"):
        return address
    if address.startswith("/"):
        return f"unix://{address}"
    if os.path.sep in address or not address.rpartition(":")[2].isdigit():
        return f"unix:{address}"
    return address


def _stub_call(
    stub: pb_grpc.LoraxServiceStub,
    method: str,
    request: Any,
    timeout_s: float | None,
    with_metadata: bool = False,
    wait_for_ready: bool = False,
) -> Any:
    call = getattr(stub, method)
    if not with_metadata:
        return call(request, timeout=timeout_s, wait_for_ready=wait_for_ready)
    response, rpc_call = call.with_call(request, timeout=timeout_s, wait_for_ready=wait_for_ready)
    return response, rpc_call.trailing_metadata() or ()


class ShardedClient:
    """Channels to every shard of one model; see module docstring for fan-out and merge rules.

    `timeout_s` is the default deadline of every call (None: no deadline); each method takes a
    `timeout_s` override. Methods raise `ShardError` once every shard has answered, so no call is left
    running behind an error: an unreachable shard's if one was (see `first_cause`), else the lowest
    failing rank's.
    """

    def __init__(self, urls: Sequence[str], timeout_s: float | None = 60.0) -> None:
        if not urls:
            raise ValueError("ShardedClient needs at least one shard address")
        self.urls = [grpc_target(u) for u in urls]
        self.timeout_s = timeout_s
        self._channels = [grpc.insecure_channel(u, options=CHANNEL_OPTIONS) for u in self.urls]
        self._stubs = [pb_grpc.LoraxServiceStub(ch) for ch in self._channels]
        self._pool = (
            ThreadPoolExecutor(max_workers=len(self.urls), thread_name_prefix="shard-call")
            if len(self.urls) > 1
            else None
        )

    @classmethod
    def connect(
        cls, uds_path_of_shard0: str, timeout_s: float | None = 60.0, connect_timeout_s: float = 60.0
    ) -> ShardedClient:
        """Connect to shard 0 (a socket path like `/tmp/qwen-0` or a `unix://` URL), waiting up to
        `connect_timeout_s` for it to come up, ask ServiceDiscovery for all shards, and open a
        channel to each (the first call on a channel connects it; see `clear_cache(wait_for_ready=)`)."""
        target = grpc_target(uds_path_of_shard0)
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            try:
                urls = list(
                    pb_grpc.LoraxServiceStub(channel)
                    .ServiceDiscovery(pb.ServiceDiscoveryRequest(), timeout=connect_timeout_s, wait_for_ready=True)
                    .urls
                )
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise ConnectionError(
                        f"no shard answered at {target} within {connect_timeout_s:g}s "
                        "(is the worker running, and is the socket path right?)"
                    ) from None
                raise ShardError(0, target, "ServiceDiscovery", err.code(), err.details()) from None
        if not urls:
            raise ShardError(0, target, "ServiceDiscovery", None, "shard 0 listed no shard addresses")
        client = cls(urls, timeout_s=timeout_s)
        log.info("connected to %d shard(s): %s", len(urls), ", ".join(client.urls))
        return client

    @property
    def world_size(self) -> int:
        return len(self.urls)

    def close(self) -> None:
        """Close every channel and the fan-out thread pool (idempotent)."""
        for channel in self._channels:
            channel.close()
        self._channels = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ fan-out

    def _call(
        self,
        rank: int,
        method: str,
        request: Any,
        timeout_s: float | None,
        with_metadata: bool = False,
        wait_for_ready: bool = False,
    ) -> Any:
        try:
            return _stub_call(self._stubs[rank], method, request, timeout_s, with_metadata, wait_for_ready)
        except grpc.RpcError as err:
            raise ShardError(rank, self.urls[rank], method, err.code(), err.details()) from None
        except ValueError as err:  # e.g. "Cannot invoke RPC on closed channel!"
            raise ShardError(rank, self.urls[rank], method, None, str(err)) from None

    def _all(
        self,
        method: str,
        request: Any,
        timeout_s: float | None = None,
        with_metadata: bool = False,
        wait_for_ready: bool = False,
    ) -> list[Any]:
        """Send `request` to every shard concurrently; responses in rank order."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not self._stubs:
            raise RuntimeError("ShardedClient is closed")
        if self._pool is None:
            return [self._call(0, method, request, timeout, with_metadata, wait_for_ready)]
        futures = [
            self._pool.submit(self._call, r, method, request, timeout, with_metadata, wait_for_ready)
            for r in range(len(self._stubs))
        ]
        errors = [err for err in (f.exception() for f in futures) if err is not None]  # waits for every shard
        if errors:
            raise first_cause(errors)
        return [f.result() for f in futures]

    def _one(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        if not self._stubs:
            raise RuntimeError("ShardedClient is closed")
        return self._call(0, method, request, self.timeout_s if timeout_s is None else timeout_s)

    # ------------------------------------------------------------------ RPCs

    def info(self, timeout_s: float | None = None) -> pb.InfoResponse:
        """Shard 0's InfoResponse, after checking every shard agrees on block_size and dtype."""
        infos = self._all("Info", pb.InfoRequest(), timeout_s)
        for rank, info in enumerate(infos[1:], start=1):
            for field in ("block_size", "dtype"):
                if getattr(info, field) != getattr(infos[0], field):
                    raise ShardMismatchError(
                        f"shard {rank} reports {field}={getattr(info, field)!r} but shard 0 "
                        f"reports {getattr(infos[0], field)!r}: every shard must match"
                    )
        return infos[0]

    def clear_cache(
        self, batch_id: int | None = None, timeout_s: float | None = None, wait_for_ready: bool = False
    ) -> None:
        """Drop one cached batch, or every cached batch when `batch_id` is None. With `wait_for_ready`
        (the router's first call) a shard that is still coming up is waited for, up to the deadline."""
        request = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)
        self._all("ClearCache", request, timeout_s, wait_for_ready=wait_for_ready)

    def warmup(
        self,
        batch: pb.Batch,
        max_input_length: int,
        max_prefill_tokens: int,
        max_new_tokens: int,
        timeout_s: float | None = None,
    ) -> int | None:
        """Minimum `max_supported_total_tokens` over the shards (None if no shard answers one)."""
        request = pb.WarmupRequest(
            batch=batch,
            max_input_length=max_input_length,
            max_prefill_tokens=max_prefill_tokens,
            max_new_tokens=max_new_tokens,
        )
        answers = [
            r.max_supported_total_tokens
            for r in self._all("Warmup", request, timeout_s)
            if r.HasField("max_supported_total_tokens")
        ]
        return min(answers) if answers else None

    def prefill(
        self, batch: pb.Batch, cached_batch: pb.CachedBatch | None = None, timeout_s: float | None = None
    ) -> StepResult:
        request = pb.PrefillRequest(batch=batch)
        if cached_batch is not None:
            request.cached_batch.CopyFrom(cached_batch)
        return _merge_step(self._all("Prefill", request, timeout_s))

    def decode(self, batches: Sequence[pb.CachedBatch], timeout_s: float | None = None) -> StepResult:
        """One step over the listed cached batches (the shards merge them, keeping the first id)."""
        return _merge_step(self._all("Decode", pb.DecodeRequest(batches=list(batches)), timeout_s))

    def filter_batch(self, batch_id: int, request_ids: Sequence[int], timeout_s: float | None = None) -> pb.CachedBatch:
        """Keep only `request_ids` (in that order) of a cached batch; shard 0's resulting batch."""
        request = pb.FilterBatchRequest(batch_id=batch_id, request_ids=list(request_ids))
        return self._all("FilterBatch", request, timeout_s)[0].batch

    def health(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Health on every shard; per shard, its trailing metadata (JSON values decoded)."""
        out = []
        for _, metadata in self._all("Health", pb.HealthRequest(), timeout_s, with_metadata=True):
            out.append({key: _maybe_json(value) for key, value in metadata})
        return out

    def download_adapter(
        self, params: pb.AdapterParameters, source: int, api_token: str | None = None, timeout_s: float | None = None
    ) -> pb.DownloadAdapterResponse:
        """DownloadAdapter on shard 0 only (the shards share the adapter files)."""
        request = pb.DownloadAdapterRequest(adapter_parameters=params, adapter_source=source)
        if api_token is not None:
            request.api_token = api_token
        return self._one("DownloadAdapter", request, timeout_s)

    def load_adapter(
        self,
        params: pb.AdapterParameters,
        source: int,
        index: int,
        api_token: str | None = None,
        timeout_s: float | None = None,
    ) -> bool:
        """LoadAdapter into `index` on every shard; True when every shard says loaded."""
        request = pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=source, adapter_index=index)
        if api_token is not None:
            request.api_token = api_token
        return all(r.loaded for r in self._all("LoadAdapter", request, timeout_s))

    def offload_adapter(
        self, params: pb.AdapterParameters, source: int, index: int, timeout_s: float | None = None
    ) -> bool:
        """OffloadAdapter `index` on every shard; True when every shard says offloaded."""
        request = pb.OffloadAdapterRequest(adapter_parameters=params, adapter_source=source, adapter_index=index)
        return all(r.offloaded for r in self._all("OffloadAdapter", request, timeout_s))


def first_cause(errors: Sequence[BaseException]) -> BaseException:
    """The error to raise when shards failed one fan-out call: a shard that could not be reached
    (UNAVAILABLE: it died or is not listening) before the others, whose calls then fail because a
    collective lost its peer; else the lowest rank. The other shards' statuses are appended."""
    shard_errors = [e for e in errors if isinstance(e, ShardError)]
    if len(shard_errors) != len(errors):
        return errors[0]
    gone = [e for e in shard_errors if e.code == grpc.StatusCode.UNAVAILABLE]
    first = (gone or shard_errors)[0]
    others = [e for e in shard_errors if e is not first]
    if not others:
        return first
    also = ", ".join(f"shard {e.rank} {e.code.name if e.code is not None else 'ERROR'}" for e in others)
    return ShardError(first.rank, first.url, first.method, first.code, f"{first.details} (also failed: {also})")


def _merge_step(responses: list[Any]) -> StepResult:
    """LoRAX merge rule: every shard's generations, in rank order; the batch of shard 0."""
    generations = [g for r in responses for g in r.generations]
    first = responses[0]
    return generations, (first.batch if first.HasField("batch") else None)


def _maybe_json(value: str | bytes) -> Any:
    if isinstance(value, bytes):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value
