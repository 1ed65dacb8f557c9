"""The life of one generation request, shared by the LoRAX and OpenAI routes: take a concurrency
slot, load the adapter, submit, then either wait for the outcomes (cancelling if the client goes
away) or stream server-sent events (the slot is given back and unfinished sequences are cancelled
when the response ends, however it ends)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from router_client.front.errors import FrontError
from router_client.front.params import AdapterRef
from router_client.front.service import Front, Job, Outcome, Run

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def received_at(request: Request) -> float:
    """When the request arrived (stamped by the front's middleware)."""
    return float(request.scope.get("state", {}).get("received", time.perf_counter()))


def sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def finite(value: float, default: float | None = None) -> float | None:
    return value if math.isfinite(value) else default


async def begin(
    front: Front, request: Request, jobs: list[Job], ref: AdapterRef | None, structured: bool, stream: bool
) -> Run:
    """Admit, resolve the adapter, submit. A stream also waits for every sequence's first token (or
    its refusal), so that errors at Prefill still get an HTTP status. On failure the slot is given back."""
    front.admit()
    run: Run | None = None
    try:
        index = await front.adapter_index(ref)
        run = front.start(jobs, index, received_at(request), structured)
        if stream:
            await run.started()
        return run
    except BaseException:
        if run is not None:
            run.cancel()
        front.release()
        raise


async def collect(front: Front, run: Run, request: Request) -> list[Outcome]:
    """Every sequence's outcome; cancels them if the client disconnects first. Gives the slot back."""
    try:
        outcomes = asyncio.ensure_future(run.outcomes())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({outcomes, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not outcomes.done():
            outcomes.cancel()
            run.cancel()
            raise FrontError(424, "cancelled", "the client disconnected before the generation finished")
        error = run.record()
        if error is not None:
            raise error
        return outcomes.result()
    finally:
        run.cancel()
        front.release()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs exactly once when the response ends, whether it finished,
    failed or the client disconnected."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close: Callable[[], None] | None = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close, self._on_close = self._on_close, None
            if close is not None:
                close()


def event_stream(front: Front, run: Run, events: AsyncIterator[bytes]) -> EventStream:
    def close() -> None:
        if not all(h.done for h in run.handles):  # the client went away mid-stream
            front.metrics.request_failed("cancelled")
        run.cancel()
        front.release()

    return EventStream(events, close)
