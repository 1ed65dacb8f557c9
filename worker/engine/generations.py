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
    """Tokens with their log-probs and texts: a step's tokens (one, or more with speculation), or a prompt's
    (prefill logprobs)."""

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
    skipped_tokens: int = 0  # speculative decoding: tokens after the first of each step (LoRAX's count)


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


def next_tokens(
    tok: QwenTokenizer, ids: list[int], logprobs: list[float], texts: list[str], alts: list[Alternatives]
) -> Tokens:
    """A step's tokens (at least one); `texts` are their incremental detokenizations."""
    return Tokens(
        ids=ids, logprobs=logprobs, texts=texts, is_special=[tok.is_special(t) for t in ids], alternative_tokens=alts
    )


def prompt_text(tok: QwenTokenizer, ids: list[int], logprobs: list[float]) -> Tokens:
    """A prompt's computed tokens with their log-probs (NaN for the first; engine/chunks.py gathers them)."""
    return Tokens(
        ids=ids,
        logprobs=logprobs,
        texts=[tok.token_text(t) for t in ids],
        is_special=[tok.is_special(t) for t in ids],
    )


def generated_text(
    tok: QwenTokenizer, generated: list[int], reason: FinishReason, seed: int | None, skipped: int = 0
) -> GeneratedText:
    return GeneratedText(
        text=tok.decode(generated, skip_special_tokens=True),
        generated_tokens=len(generated),
        finish_reason=reason,
        seed=seed,
        skipped_tokens=skipped,
    )
