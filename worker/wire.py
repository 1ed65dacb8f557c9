"""The engine's results as LoRAX protobuf messages: the one place the server side builds them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from worker.engine.generations import CachedBatchInfo, Generation, Tokens
from worker.pb import generate_pb2 as pb

StepResponse = TypeVar("StepResponse", bound=pb.PrefillResponse | pb.DecodeResponse)


def tokens_pb(t: Tokens) -> pb.NextTokens:
    alternatives = [pb.AlternativeTokens(ids=a.ids, logprobs=a.logprobs, texts=a.texts) for a in t.alternative_tokens]
    return pb.NextTokens(
        ids=t.ids, logprobs=t.logprobs, texts=t.texts, is_special=t.is_special, alternative_tokens=alternatives
    )


def generation_pb(g: Generation) -> pb.Generation:
    out = pb.Generation(
        request_id=g.request_id, next_tokens=tokens_pb(g.next_tokens), prefill_tokens_length=g.prefill_tokens_length
    )
    if g.prefill_tokens is not None:
        out.prefill_tokens.CopyFrom(tokens_pb(g.prefill_tokens))
    if g.generated_text is not None:
        t = g.generated_text
        out.generated_text.CopyFrom(
            pb.GeneratedText(
                text=t.text,
                generated_tokens=t.generated_tokens,
                skipped_tokens=t.skipped_tokens,
                finish_reason=int(t.finish_reason),
            )
        )
        if t.seed is not None:  # an optional field: present for sampling requests only
            out.generated_text.seed = t.seed
    return out


def cached_batch_pb(b: CachedBatchInfo) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=b.id, request_ids=b.request_ids, size=b.size, max_tokens=b.max_tokens, current_tokens=b.current_tokens
    )


def step_response(
    cls: type[StepResponse], generations: Sequence[Generation], batch: CachedBatchInfo | None
) -> StepResponse:
    """A PrefillResponse or DecodeResponse; `batch` None: every request finished (no batch field)."""
    resp = cls(generations=[generation_pb(g) for g in generations])
    if batch is not None:
        resp.batch.CopyFrom(cached_batch_pb(batch))
    return resp
