"""The engine's results as LoRAX protobuf messages: the one place the server side builds them.

Messages are filled in place (`add()` on the repeated field, `extend` on the scalar lists): that is about
three times faster than building each nested message and copying it into its parent, which matters for a
Decode's 64+ Generations per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from worker.engine.generations import CachedBatchInfo, Generation, Tokens
from worker.pb import generate_pb2 as pb

StepResponse = TypeVar("StepResponse", bound=pb.PrefillResponse | pb.DecodeResponse)


def _fill_tokens(out: pb.NextTokens, t: Tokens) -> None:
    out.SetInParent()  # present even when empty, as a message built and copied in would be
    out.ids.extend(t.ids)
    out.logprobs.extend(t.logprobs)
    out.texts.extend(t.texts)
    out.is_special.extend(t.is_special)
    for a in t.alternative_tokens:
        out.alternative_tokens.add(ids=a.ids, logprobs=a.logprobs, texts=a.texts)


def tokens_pb(t: Tokens) -> pb.NextTokens:
    out = pb.NextTokens()
    _fill_tokens(out, t)
    return out


def _fill_generation(out: pb.Generation, g: Generation) -> None:
    out.request_id = g.request_id
    out.prefill_tokens_length = g.prefill_tokens_length
    _fill_tokens(out.next_tokens, g.next_tokens)
    if g.prefill_tokens is not None:
        _fill_tokens(out.prefill_tokens, g.prefill_tokens)
    if g.generated_text is not None:
        t, done = g.generated_text, out.generated_text
        done.SetInParent()
        done.text = t.text
        done.generated_tokens = t.generated_tokens
        done.skipped_tokens = t.skipped_tokens
        done.finish_reason = int(t.finish_reason)  # the enum's value
        if t.seed is not None:  # an optional field: present for sampling requests only
            done.seed = t.seed


def generation_pb(g: Generation) -> pb.Generation:
    out = pb.Generation()
    _fill_generation(out, g)
    return out


def cached_batch_pb(b: CachedBatchInfo) -> pb.CachedBatch:
    return pb.CachedBatch(
        id=b.id, request_ids=b.request_ids, size=b.size, max_tokens=b.max_tokens, current_tokens=b.current_tokens
    )


def step_response(
    cls: type[StepResponse], generations: Sequence[Generation], batch: CachedBatchInfo | None
) -> StepResponse:
    """A PrefillResponse or DecodeResponse; `batch` None: every request finished (no batch field)."""
    resp = cls()
    add = resp.generations.add
    for g in generations:
        _fill_generation(add(), g)
    if batch is not None:
        b = resp.batch
        b.id, b.size, b.max_tokens, b.current_tokens = batch.id, batch.size, batch.max_tokens, batch.current_tokens
        b.request_ids.extend(batch.request_ids)
        b.SetInParent()  # present even when every field is a default (the router tells "no batch" by absence)
    return resp
