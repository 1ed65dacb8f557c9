"""What a caller of the router sees: request handles, token events, results, errors."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from worker.pb import generate_pb2 as pb

U64_MAX = 2**64 - 1
FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS_TOKEN: "eos_token",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}
CANCELLED = "CANCELLED"  # RequestError.code of a request its caller cancelled


class ValidationError(ValueError):
    """A request the router refuses before sending it anywhere."""


class RequestError(RuntimeError):
    """A request failed after it was accepted (a shard error, or the router closed). `code` is the
    shard's gRPC status name (e.g. "INVALID_ARGUMENT") when a shard refused it, `CANCELLED` when
    its caller cancelled it, else None; `at_prefill` is True when its Prefill failed."""

    def __init__(self, message: str, code: str | None = None, at_prefill: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.at_prefill = at_prefill


@dataclass(frozen=True)
class Alternative:
    id: int
    logprob: float
    text: str


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, in the order the shard produced it."""

    id: int
    text: str
    logprob: float
    special: bool
    alternatives: tuple[Alternative, ...] = ()
    last: bool = False  # the request's final token (its result follows)


@dataclass(frozen=True)
class PrefillToken:
    id: int
    logprob: float  # NaN for the first prompt token
    text: str


@dataclass
class GenerationResult:
    """The finished request."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    prefill_tokens: list[PrefillToken]
    prefill_tokens_length: int
    seed: int | None
    request_id: int
    ttft_s: float  # submit -> first token
    latency_s: float  # submit -> finished
    skipped_tokens: int = 0  # speculative decoding: accepted tokens beyond the first of each step


class RequestHandle:
    """Handle to one submitted request. `stream()` yields `TokenEvent`s as they arrive (once per
    handle); `result()` blocks for the `GenerationResult` and raises `RequestError` on failure.
    The router's loop thread feeds it; every other method may be called from any thread.

    Event-loop callers use `take()` instead of `stream()`, with `notify` (called on the router's
    thread after new events or the end are queued) to wake them."""

    _DONE = object()

    def __init__(self, request_id: int, prompt_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None  # the router sent its Prefill
        self.first_token_at: float | None = None
        self.notify: Callable[[], None] | None = None
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Event()
        self._tokens: list[int] = []
        self._prefill: list[PrefillToken] = []
        self._prefill_length = 0
        self._result: GenerationResult | None = None
        self._error: RequestError | None = None

    # -------------------------------------------------------------- caller side

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes; raises RequestError if it failed, TimeoutError on timeout."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def stream(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Token events until the request finishes; raises RequestError if it fails mid-way."""
        while True:
            try:
                item = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id}: no token for {timeout}s") from None
            if item is self._DONE:
                break
            yield item
        if self._error is not None:
            raise self._error

    def take(self) -> tuple[list[TokenEvent], bool]:
        """Without blocking: the token events queued since the last call, and whether the request
        has finished (then `result()` answers at once). Consumes what `stream()` would yield."""
        events: list[TokenEvent] = []
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return events, False
            if item is self._DONE:
                return events, True
            events.append(item)

    # -------------------------------------------------------------- router side

    def _on_generation(self, gen: pb.Generation) -> bool:
        """Record one Generation (token events go out at once); True when it finished the request."""
        if gen.prefill_tokens_length:
            self._prefill_length = gen.prefill_tokens_length
        if gen.HasField("prefill_tokens") and gen.prefill_tokens.ids:
            pt = gen.prefill_tokens
            self._prefill = [PrefillToken(i, lp, t) for i, lp, t in zip(pt.ids, pt.logprobs, _texts(pt))]
        nt = gen.next_tokens
        if nt.ids and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        final = gen.HasField("generated_text")
        for k, token_id in enumerate(nt.ids):
            alts: tuple[Alternative, ...] = ()
            if k < len(nt.alternative_tokens):
                a = nt.alternative_tokens[k]
                alts = tuple(Alternative(i, lp, t) for i, lp, t in zip(a.ids, a.logprobs, _texts(a)))
            self._tokens.append(token_id)
            self._events.put(
                TokenEvent(
                    token_id,
                    _at(nt.texts, k, ""),
                    _at(nt.logprobs, k, float("nan")),
                    _at(nt.is_special, k, False),
                    alts,
                    final and k == len(nt.ids) - 1,
                )
            )
        if not final:
            if nt.ids and self.notify is not None:
                self.notify()
            return False
        done = gen.generated_text
        now = time.perf_counter()
        self._result = GenerationResult(
            text=done.text,
            token_ids=list(self._tokens),
            finish_reason=FINISH_REASONS.get(done.finish_reason, "unknown"),
            generated_tokens=done.generated_tokens,
            prefill_tokens=self._prefill,
            prefill_tokens_length=self._prefill_length,
            seed=done.seed if done.HasField("seed") else None,
            request_id=self.request_id,
            ttft_s=(self.first_token_at or now) - self.submitted_at,
            latency_s=now - self.submitted_at,
            skipped_tokens=done.skipped_tokens,
        )
        return True  # the router calls _finish() once its bookkeeping for this step is done

    def _fail(self, message: str, code: str | None = None, at_prefill: bool = False) -> None:
        if self._done.is_set():
            return
        self._error = RequestError(f"request {self.request_id} failed: {message}", code, at_prefill)
        self._finish()

    def _finish(self) -> None:
        self._events.put(self._DONE)
        self._done.set()
        if self.notify is not None:
            self.notify()


def _texts(tokens: Any) -> list[str]:
    return list(tokens.texts) if len(tokens.texts) == len(tokens.ids) else [""] * len(tokens.ids)


def _at(seq: Any, k: int, default: Any) -> Any:
    return seq[k] if k < len(seq) else default


@dataclass
class Pending:
    """A request the router accepted: its handle, its protobuf (blocks/slots filled on admission),
    and how much KV it will need."""

    handle: RequestHandle
    request: pb.Request
    n_blocks: int
    n_tokens: int  # KV token slots it can use: prompt + max_new_tokens - 1 + speculate
    blocks: list[int] = field(default_factory=list)  # from position 0; the first len(nodes) are cached ones
    nodes: list[Any] = field(default_factory=list)  # prefix_cache.Node it references
    cache_key: tuple[int, float] | None = None  # (adapter, NTK alpha); None: no prefix cache
    cache_len: int = 0  # prompt tokens served from the prefix cache
    prefilled: bool = False  # its first token came back: its prompt's K/V are computed

    @property
    def id(self) -> int:
        return self.handle.request_id

    @property
    def prompt_tokens(self) -> int:
        return len(self.handle.prompt_ids)
