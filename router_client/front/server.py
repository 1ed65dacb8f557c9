"""`qwen-router serve`: the router plus the HTTP front, served by uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
from collections.abc import Iterator
from typing import Any

import uvicorn

log = logging.getLogger("router_client.front")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--api-key",
        default=os.environ.get("QWEN_ROUTER_API_KEY"),
        help="require `Authorization: Bearer KEY` on every route but /health "
        "(default: $QWEN_ROUTER_API_KEY; none: no check)",
    )
    p.add_argument("--model-id", default=None, help="the base model's name in answers (default: the model dir's name)")
    p.add_argument("--adapter-root", default=None, help="the shards' adapter root, listed by /v1/models")
    p.add_argument("--max-concurrent-requests", type=int, default=128, help="more in progress: 429")
    p.add_argument("--max-best-of", type=int, default=4, help="largest best_of (and OpenAI n)")
    p.add_argument("--max-stop-sequences", type=int, default=4)
    p.add_argument("--max-client-batch-size", type=int, default=4, help="prompts in one /v1/completions request")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024)
    p.add_argument("--log-level", default="info")


class _Server(uvicorn.Server):
    """uvicorn, except that SIGINT/SIGTERM end `run()` after the graceful shutdown instead of being
    raised again (which would kill the process before the router is closed)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(a: argparse.Namespace, router: Any) -> int:
    """Serve `router` (started, owned: closed here) over HTTP."""
    from router_client.front.app import create_app
    from router_client.front.service import Front, FrontConfig

    try:
        config = FrontConfig(
            model_id=a.model_id or os.path.basename(os.path.normpath(a.model_dir)),
            adapter_source=a.adapter_source,
            adapter_root=a.adapter_root,
            api_key=a.api_key or None,
            max_concurrent_requests=a.max_concurrent_requests,
            max_best_of=a.max_best_of,
            max_stop_sequences=a.max_stop_sequences,
            max_client_batch_size=a.max_client_batch_size,
            max_body_bytes=a.max_body_bytes,
        )
        front = Front(router, router.tokenizer, config)
        for adapter_id in a.adapter:
            router.load_adapter(adapter_id, a.adapter_source, reuse=True)
        app = create_app(front)
        if a.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
            log.warning("serving on %s without an API key: anyone who reaches this address can use the model", a.host)
        server = _Server(
            uvicorn.Config(
                app,
                host=a.host,
                port=a.port,
                log_level=a.log_level.lower(),
                access_log=False,
                timeout_graceful_shutdown=10,
            )
        )
        server.run()
    finally:
        router.close()
    return 0
