"""Errors of the HTTP front: one JSON shape, `{"error": message, "error_type": kind}`, with LoRAX's
status codes (422 validation, 424 generation, 429 overloaded, 500 incomplete generation, 503
unhealthy), and the mapping from router errors to them."""

from __future__ import annotations

import re
from typing import Any

from router_client.requests import CANCELLED, RequestError

REFUSED_CODES = ("INVALID_ARGUMENT", "FAILED_PRECONDITION")  # the shard refused the request itself
NO_STRUCTURED_OUTPUT = "structured output not supported by this shard"
_REQUEST_PREFIX = re.compile(r"^request \d+ failed: ")
_SHARD_ADDRESS = re.compile(r"\b(shard \d+) \([^)]*\) ")  # ShardError's "(unix:///path) ": not for clients


class FrontError(Exception):
    """An error answered as `{"error", "error_type"}` with `status`."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.error_type}


def validation(message: str) -> FrontError:
    return FrontError(422, "validation", message)


def overloaded(message: str = "Model is overloaded") -> FrontError:
    return FrontError(429, "overloaded", message)


def unhealthy(message: str) -> FrontError:
    return FrontError(503, "unhealthy", message)


def from_request_error(err: RequestError, structured: bool) -> FrontError:
    """A request the router accepted and then failed: a refusal at Prefill is the request's fault
    (422), answered in the shard's own words; anything else is a generation error (424) naming the
    shard, the call and the status (a shard that died: "shard 0 Decode failed: UNAVAILABLE: ..."),
    without socket paths."""
    message = str(err)
    if err.code == CANCELLED:
        return FrontError(424, "cancelled", message)
    if err.at_prefill and err.code in REFUSED_CODES:
        message = message.split(f"{err.code}: ", 1)[-1]
        if structured and err.code == "FAILED_PRECONDITION":
            return validation(f"{NO_STRUCTURED_OUTPUT}: {message}")
        return validation(message)
    return FrontError(424, "generation", without_address(_REQUEST_PREFIX.sub("", message)))


def without_address(message: str) -> str:
    """A ShardError's text for clients: "shard 0 (unix:///path) Decode failed: ..." without the path."""
    return _SHARD_ADDRESS.sub(r"\1 ", message)
