"""`Front`: what the HTTP routes share. It admits requests under a concurrency limit, loads adapters
on demand through the router, submits sequences, and hands each route a `Run`: the router handles
of one HTTP request, read from the event loop without blocking it (the router's thread wakes the
loop through `RequestHandle.notify`). A Run that is dropped before it ends cancels its requests in
the router, which frees their KV blocks."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from router_client.adapters import AdapterBudgetFull
from router_client.client import ShardError
from router_client.front.errors import (
    FrontError,
    from_request_error,
    overloaded,
    unhealthy,
    validation,
    without_address,
)
from router_client.front.metrics import Metrics, RequestTiming
from router_client.front.params import AdapterRef
from router_client.requests import GenerationResult, RequestError, RequestHandle, TokenEvent, ValidationError
from router_client.router import Router

log = logging.getLogger(__name__)
ADAPTER_REFUSALS = ("NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class FrontConfig:
    model_id: str
    adapter_source: str = "local"
    adapter_root: str | None = None  # listed by /v1/models when set
    api_key: str | None = None
    max_concurrent_requests: int = 128
    max_best_of: int = 4  # also the largest OpenAI `n`
    max_stop_sequences: int = 4
    max_client_batch_size: int = 4  # prompts in one completions request
    max_body_bytes: int = 2 * 1024 * 1024
    health_timeout_s: float = 30.0
    version: str = "0.1.0"


@dataclass
class Job:
    """One sequence to generate."""

    prompt_ids: list[int]
    parameters: dict[str, Any]
    stopping: dict[str, Any]
    prefill_logprobs: bool = False
    truncate: int = 0


@dataclass
class Outcome:
    """One finished sequence: its token events and result, or its error."""

    events: list[TokenEvent] = field(default_factory=list)
    result: GenerationResult | None = None
    error: FrontError | None = None


class Front:
    def __init__(self, router: Router, tokenizer: Any, config: FrontConfig) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.config = config
        self.started = int(time.time())
        self.active = 0  # HTTP generation requests in progress (event loop only)
        self.loading = 0  # adapter loads under way (event loop only)
        self.metrics = Metrics(router.load, lambda: self.loading)
        router.step_observer = self.metrics.observe_step
        self._waker: Waker | None = None

    def waker(self) -> Waker:
        """The Waker of the running event loop (the server's)."""
        loop = asyncio.get_running_loop()
        if self._waker is None or self._waker.loop is not loop:
            self._waker = Waker(loop)
        return self._waker

    def admit(self) -> None:
        """Take a concurrency slot (give it back with `release`), or 429."""
        if self.active >= self.config.max_concurrent_requests:
            raise overloaded(
                f"Model is overloaded: {self.active} requests in progress "
                f"(max_concurrent_requests {self.config.max_concurrent_requests})"
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    async def adapter_index(self, ref: AdapterRef | None) -> int:
        """The router's index of this adapter, loading it (from the adapter root) on first use."""
        if ref is None:
            self.metrics.adapter_used("")
            return 0
        self.loading += 1
        try:
            index = await asyncio.to_thread(self.router.load_adapter, ref.to_pb(), ref.source, ref.api_token, True)
        except AdapterBudgetFull as err:
            raise overloaded(str(err)) from None
        except ValidationError as err:
            raise validation(str(err)) from None
        except ShardError as err:
            code = err.code.name if err.code is not None else ""
            if code in ADAPTER_REFUSALS:
                raise validation(f"adapter {ref.label!r} cannot be loaded: {err.details}") from None
            raise FrontError(
                424, "generation", f"adapter {ref.label!r} failed to load: {without_address(str(err))}"
            ) from None
        except RuntimeError as err:
            raise unhealthy(str(err)) from None
        finally:
            self.loading -= 1
        self.metrics.adapter_used(ref.label)
        return index

    def start(self, jobs: list[Job], adapter_index: int, received: float, structured: bool) -> Run:
        """Submit every sequence of one HTTP request; 422 if the router refuses one (then none runs)."""
        handles: list[RequestHandle] = []
        try:
            for job in jobs:
                handles.append(
                    self.router.submit(
                        job.prompt_ids, job.parameters, job.stopping, adapter_index, job.prefill_logprobs, job.truncate
                    )
                )
        except ValidationError as err:
            for h in handles:
                self.router.cancel(h.request_id)
            raise validation(str(err)) from None
        except RequestError as err:
            raise unhealthy(str(err)) from None
        return Run(self, handles, received, time.perf_counter(), structured)

    async def healthy(self) -> bool:
        """LoRAX's generation probe (a one-token Prefill) through the router, within the timeout."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.router.health_probe), self.config.health_timeout_s)
        except Exception as err:  # a timeout, or the router is closed
            log.warning("health probe failed: %r", err)
            return False


class Waker:
    """Wakes event-loop waiters from the router's thread, one loop callback per burst: a step that
    advances 64 streams costs one cross-thread wake-up, not 64 (each is a syscall that also hands the
    GIL to the event loop in the middle of the router's bookkeeping)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Event] = []

    def wake(self, event: asyncio.Event) -> None:  # any thread
        with self._lock:
            self._pending.append(event)
            if len(self._pending) > 1:
                return  # a flush is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _flush(self) -> None:  # on the event loop
        with self._lock:
            events, self._pending = self._pending, []
        for event in events:
            event.set()


class Run:
    """The router handles of one HTTP request, read from the event loop."""

    def __init__(
        self, front: Front, handles: list[RequestHandle], received: float, submitted: float, structured: bool
    ) -> None:
        self.front = front
        self.handles = handles
        self.received = received
        self.submitted = submitted
        self.structured = structured
        self._waker = front.waker()
        self._wake = asyncio.Event()
        self._buffers: list[collections.deque[TokenEvent | None]] = [collections.deque() for _ in handles]
        self._ended = [False] * len(handles)  # the end marker (None) was buffered
        self._delivered = [False] * len(handles)  # ... and handed out
        for h in handles:
            h.notify = self._notify

    def _notify(self) -> None:  # on the router's thread
        self._waker.wake(self._wake)

    def _pull(self) -> None:
        self._wake.clear()
        for i, h in enumerate(self.handles):
            if not self._ended[i]:
                events, done = h.take()
                self._buffers[i].extend(events)
                if done:
                    self._buffers[i].append(None)
                    self._ended[i] = True

    async def started(self) -> None:
        """Wait until every sequence produced a token or ended; raise its error if one failed before
        its first token (the others are cancelled), so a stream can still answer an HTTP error."""
        while True:
            self._pull()
            if all(self._buffers[i] or self._ended[i] for i in range(len(self.handles))):
                break
            await self._wake.wait()
        for i, buf in enumerate(self._buffers):
            if buf and buf[0] is None:
                error = self.error(i)
                if error is not None:
                    self.cancel()
                    raise error

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | None]]:
        """(sequence index, event) as they come; (i, None) once sequence i has ended."""
        while not all(self._delivered):
            self._pull()
            for i, buf in enumerate(self._buffers):
                while buf:
                    event = buf.popleft()
                    if event is None:
                        self._delivered[i] = True
                    yield i, event
            if not all(self._delivered):
                await self._wake.wait()

    async def outcomes(self) -> list[Outcome]:
        """Wait for every sequence; their events and results (or errors)."""
        out = [Outcome() for _ in self.handles]
        async for i, event in self.events():
            if event is not None:
                out[i].events.append(event)
            else:
                out[i].result, out[i].error = self.result(i), self.error(i)
        return out

    def result(self, i: int) -> GenerationResult | None:
        try:
            return self.handles[i].result(timeout=0)
        except (RequestError, TimeoutError):
            return None

    def error(self, i: int) -> FrontError | None:
        try:
            self.handles[i].result(timeout=0)
            return None
        except RequestError as err:
            return from_request_error(err, self.structured)

    def cancel(self) -> None:
        """Cancel every sequence not yet finished (the router drops it and frees its blocks)."""
        for h in self.handles:
            if not h.done:
                self.front.router.cancel(h.request_id)

    def record(self) -> FrontError | None:
        """Once every sequence ended: its first error, if any (counted where it is answered), else
        count the request's success and timings in the metrics."""
        m = self.front.metrics
        errors = [e for e in (self.error(i) for i in range(len(self.handles))) if e is not None]
        if errors:
            return errors[0]
        for h in self.handles:
            res = h.result(timeout=0)
            finished = h.submitted_at + res.latency_s
            admitted = h.admitted_at or h.submitted_at
            m.request_succeeded(
                RequestTiming(
                    received=self.received,
                    submitted=self.submitted,
                    admitted=admitted,
                    first_token=h.first_token_at or finished,
                    finished=finished,
                    input_tokens=len(h.prompt_ids),
                    generated_tokens=res.generated_tokens,
                    skipped_tokens=res.skipped_tokens,
                )
            )
        return None
