"""What a step reports, as plain data; worker/wire.py turns it into the contract's protobuf messages.

Field names follow generate.proto (Generation, NextTokens, AlternativeTokens, GeneratedText, CachedBatch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from worker.engine.stopping import FinishReason


@dataclass
class Alternatives:
    """The most likely tokens at one position, by decreasing log-prob."""

    ids: list[int]
    logprobs: list[float]
    texts: list[str]


@dataclass
class Tokens:
    """Tokens with their log-probs and texts: the sampled token, or a prompt's (prefill logprobs)."""

    ids: list[int]
    logprobs: list[float]  # a prompt's first token has none: NaN
    texts: list[str]
    is_special: list[bool]
    alternative_tokens: list[Alternatives] = field(default_factory=list)  # one per token, when asked for


@dataclass
class GeneratedText:
    """A finished request's output."""

    text: str
    generated_tokens: int
    finish_reason: FinishReason
    seed: Optional[int] = None  # sampling requests only


@dataclass
class Generation:
    """One request's result of one step."""

    request_id: int
    next_tokens: Tokens
    prefill_tokens: Optional[Tokens] = None  # Prefill of a request that asked for prefill logprobs
    prefill_tokens_length: int = 0  # prompt tokens computed by this Prefill (0 in Decode)
    generated_text: Optional[GeneratedText] = None  # set when the request finished


@dataclass
class CachedBatchInfo:
    """A live batch as the router sees it."""

    id: int
    request_ids: list[int]
    size: int
    max_tokens: int  # KV token slots the batch holds
    current_tokens: int
