"""What a step reports, as plain data; worker/wire.py turns it into the contract's protobuf messages.

Field names follow generate.proto (Generation, NextTokens, AlternativeTokens, GeneratedText, CachedBatch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine.stopping import FinishReason
from worker.tokenizer import QwenTokenizer


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
    seed: int | None = None  # sampling requests only


@dataclass
class Generation:
    """One request's result of one step."""

    request_id: int
    next_tokens: Tokens
    prefill_tokens: Tokens | None = None  # first token of a request that asked for prefill logprobs
    prefill_tokens_length: int = 0  # with the first token: prompt tokens computed (after cache_len), else 0
    generated_text: GeneratedText | None = None  # set when the request finished


@dataclass
class CachedBatchInfo:
    """A live batch as the router sees it."""

    id: int
    request_ids: list[int]
    size: int
    max_tokens: int  # KV token slots the batch holds
    current_tokens: int


def alternatives(tok: QwenTokenizer, ids: list[int], logprobs: list[float]) -> Alternatives:
    return Alternatives(ids=ids, logprobs=logprobs, texts=[tok.token_text(t) for t in ids])


def next_token(tok: QwenTokenizer, token_id: int, logprob: float, text: str, alts: list[Alternatives]) -> Tokens:
    return Tokens(
        ids=[token_id], logprobs=[logprob], texts=[text], is_special=[tok.is_special(token_id)], alternative_tokens=alts
    )


def prompt_text(tok: QwenTokenizer, ids: list[int], logprobs: list[float]) -> Tokens:
    """A prompt's computed tokens with their log-probs (NaN for the first; engine/chunks.py gathers them)."""
    return Tokens(
        ids=ids,
        logprobs=logprobs,
        texts=[tok.token_text(t) for t in ids],
        is_special=[tok.is_special(t) for t in ids],
    )


def generated_text(tok: QwenTokenizer, generated: list[int], reason: FinishReason, seed: int | None) -> GeneratedText:
    return GeneratedText(
        text=tok.decode(generated, skip_special_tokens=True),
        generated_tokens=len(generated),
        finish_reason=reason,
        seed=seed,
    )
