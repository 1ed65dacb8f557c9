"""One place mapping failures to gRPC status codes, with messages a person can act on."""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)
MAX_MESSAGE = 2000  # characters of a status message: gRPC drops a call whose metadata exceeds ~16 KB


class WorkerError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(WorkerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(WorkerError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(WorkerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(WorkerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(WorkerError):
    code = grpc.StatusCode.UNIMPLEMENTED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised while serving a call, its message cut to MAX_MESSAGE (a
    request's own huge string echoed back would otherwise replace the answer with a transport error)."""
    code, message = _status_of(exc)
    if len(message) > MAX_MESSAGE:
        message = f"{message[: MAX_MESSAGE - 40]}... ({len(message)} characters, cut)"
    return code, message


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, WorkerError):
        return exc.code, str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {exc}"
    if isinstance(exc, ValueError):  # validation in plain-Python modules (sampling, stopping, tokenizer)
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for servicer methods: any exception becomes `context.abort(code, message)`."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps them
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed:\n%s", method.__name__, traceback.format_exc())
            else:
                log.warning("%s rejected: %s: %s", method.__name__, code.name, message)
            context.abort(code, message)

    return wrapper
