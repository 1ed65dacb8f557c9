"""Thin gRPC servicer for LoRAX's `generate.v1.LoraxService`: protobuf → engine → protobuf (worker/wire.py).

One lock serialises the calls: every shard must run the same sequence of steps. Errors are mapped
to gRPC status codes in worker/errors.py.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent import futures

import grpc

from worker.distributed import bind_thread, resolve_device
from worker.engine.engine import Engine
from worker.errors import NotFound, Unimplemented, rpc
from worker.health import ShardHealth
from worker.pb import generate_pb2 as pb
from worker.pb import generate_pb2_grpc as pb_grpc
from worker.wire import cached_batch_pb, step_response

log = logging.getLogger(__name__)
STATS_KEY = "x-qwen-worker-stats"  # Health's trailing metadata: live batches, shard-owned KV blocks


class LoraxServicer(pb_grpc.LoraxServiceServicer):
    def __init__(self, engine: Engine, uds_path: str, device_type: str, adapters: object = None):
        self.engine = engine
        self.uds_path = uds_path
        self.device_type = device_type
        self.adapters = adapters
        self.lock = threading.Lock()
        self.health: ShardHealth | None = None  # grpc.health.v1, set by make_server

    @rpc
    def Info(self, request, context):
        e = self.engine
        preloaded = self.adapters.preloaded_pb() if self.adapters is not None else []
        return pb.InfoResponse(
            requires_padding=False,
            dtype=str(e.model.dtype).replace("torch.", ""),
            device_type=self.device_type,
            block_size=e.cfg.block_size,
            speculate=e.speculation.tokens,
            preloaded_adapters=preloaded,
            supports_generation=True,
            supports_embeddings=False,
            supports_classification=False,
            chunked_prefill=e.cfg.chunked_prefill,
            requires_block_allocator=True,
        )

    @rpc
    def ServiceDiscovery(self, request, context):
        return pb.ServiceDiscoveryResponse(
            urls=[f"unix://{self.uds_path}-{r}" for r in range(self.engine.pctx.world_size)]
        )

    @rpc
    def ClearCache(self, request, context):
        with self.lock:
            self.engine.clear(request.id if request.HasField("id") else None)
        return pb.ClearCacheResponse()

    @rpc
    def FilterBatch(self, request, context):
        with self.lock:
            info = self.engine.filter(request.batch_id, list(request.request_ids)).info()
        return pb.FilterBatchResponse(batch=cached_batch_pb(info))

    @rpc
    def Warmup(self, request, context):
        with self.lock:
            tokens = self.engine.warmup(request)
        if self.health is not None:
            self.health.serving()
        return pb.WarmupResponse(max_supported_total_tokens=tokens)

    @rpc
    def Prefill(self, request, context):
        with self.lock:
            cached = request.cached_batch if request.HasField("cached_batch") else None
            generations, batch = self.engine.prefill(request.batch, cached)
            info = batch.info() if batch is not None else None
        return step_response(pb.PrefillResponse, generations, info)

    @rpc
    def Decode(self, request, context):
        with self.lock:
            generations, batch = self.engine.decode(list(request.batches))
            info = batch.info() if batch is not None else None
        return step_response(pb.DecodeResponse, generations, info)

    @rpc
    def Health(self, request, context):
        with self.lock:
            self.engine.health()
            stats = self.engine.stats()
            if self.adapters is not None:
                stats.update(self.adapters.stats())
        context.set_trailing_metadata(((STATS_KEY, json.dumps(stats)),))
        return pb.HealthResponse()

    @rpc
    def Embed(self, request, context):
        raise Unimplemented("Embed is not available: this worker serves a causal LM (Qwen v1), not an embedder")

    @rpc
    def Classify(self, request, context):
        raise Unimplemented("Classify is not available: this worker serves a causal LM (Qwen v1), not a classifier")

    def _adapter_pool(self):
        if self.adapters is None:
            raise NotFound("adapters are not enabled on this shard (start it with --adapter-root)")
        return self.adapters

    @rpc
    def DownloadAdapter(self, request, context):
        with self.lock:
            return self._adapter_pool().download(request)

    @rpc
    def LoadAdapter(self, request, context):
        with self.lock:
            return self._adapter_pool().load(request)

    @rpc
    def OffloadAdapter(self, request, context):
        with self.lock:
            return self._adapter_pool().offload(request)


def make_server(servicer: LoraxServicer, socket_path: str, workers: int = 4) -> grpc.Server:
    """A gRPC server bound to the unix socket `socket_path`, created owner-only (0600)."""
    import os

    if os.path.exists(socket_path):
        os.unlink(socket_path)  # stale socket from a crashed run
    device = resolve_device(servicer.engine.pctx.device)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, initializer=bind_thread, initargs=(device,)),
        options=[
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ],
    )
    pb_grpc.add_LoraxServiceServicer_to_server(servicer, server)
    servicer.health = ShardHealth(server)  # standard health (SERVING after Warmup) and reflection
    old = os.umask(0o177)  # the socket is born 0600: no window with other bits
    try:
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
    finally:
        os.umask(old)
    if os.path.exists(socket_path):
        os.chmod(socket_path, 0o600)
    return server


def serve_forever(
    server: grpc.Server, socket_path: str, stop: threading.Event | None = None, health: ShardHealth | None = None
) -> None:
    """Block until SIGTERM/SIGINT (or `stop`), then report NOT_SERVING, shut down and remove the socket."""
    import os
    import signal

    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    if health is not None:
        health.shutdown()
    server.stop(grace=2).wait()
    if os.path.exists(socket_path):
        os.unlink(socket_path)
