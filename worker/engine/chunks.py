"""Chunked prefill bookkeeping (LoRAX semantics): which tokens each request computes in the next forward, the
chunk sizes the shard gives requests still prefilling, and the prefill logprobs gathered over their chunks.

A request is prefilling until its first token is sampled. Its next forward computes prompt positions
[n_cached, n_cached + chunk); only the chunk that reaches the end of the prompt samples. A decoding request
computes its last token, then its drafts when it speculates (a verify row, engine/speculative.py). Plain
Python over RequestState (no forward pass); every rank takes the same decisions from the same state, so the
ranks' forwards stay in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from worker.engine.batch import Batch, RequestState
from worker.engine.logits_processors import prefill_logprobs


@dataclass(frozen=True)
class RowSpan:
    """The tokens ids[start:stop] a request computes in one forward, then its `drafts` (positions stop, ...)."""

    start: int
    stop: int
    prompt_logits: bool  # logits for every computed token (prefill logprobs, or a verify row), not only the last
    drafts: tuple[int, ...] = ()  # speculative tokens verified after ids[start:stop] (a decoding request only)

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start + len(self.drafts)


@dataclass(frozen=True)
class StepPlan:
    spans: list[RowSpan]  # one per request, in batch order
    sampling: list[int]  # rows that sample a token this step (decoding, or on their last chunk)
    prefill: bool  # the forward takes the prefill path: some row computes prompt tokens
    verify: bool = False  # some row verifies drafts (it takes the prefill path too: rows of several tokens)


class Runnable(Protocol):
    """What a default span reads of a request (RequestState, or a test's stand-in)."""

    ids: list[int]
    n_cached: int
    prefill_logprobs: bool


def default_span(r: Runnable, prefill: bool) -> RowSpan:
    """A whole-prompt prefill computes ids[n_cached:]; a decode the last token."""
    if prefill:
        return RowSpan(r.n_cached, len(r.ids), r.prefill_logprobs)
    return RowSpan(len(r.ids) - 1, len(r.ids), False)


# Drafts are verified only in batches of at most this many requests: the verify CUDA graphs
# (engine/graphed_verify.py) go up to 32 rows, and on the H200 an eager verify step of 64 rows x 5 tokens cost 3x
# a graphed decode step, so a copy workload gained 1.02x at batch 64 against 1.88x at batch 32
# (scripts/bench_spec.py, 2026-11-29). Larger batches decode plainly (their drafts wait: a batch that shrinks
# verifies them again). LoRAX stops at 32 verify rows in all (B x (S + 1)).
MAX_VERIFY_ROWS = 32


def span(r: RequestState, verify: bool = True) -> RowSpan:
    if not r.prefilling:
        drafts = tuple(r.drafts) if verify else ()
        return RowSpan(len(r.ids) - 1, len(r.ids), bool(drafts), drafts)
    return RowSpan(r.n_cached, r.n_cached + r.chunk, r.prefill_logprobs)


def plan(batch: Batch) -> StepPlan:
    reqs = batch.requests
    verify = len(reqs) <= MAX_VERIFY_ROWS
    spans = [span(r, verify) for r in reqs]
    sampling = [i for i, (r, s) in enumerate(zip(reqs, spans)) if s.stop >= len(r.ids)]
    return StepPlan(spans, sampling, any(r.prefilling for r in reqs), any(s.drafts for s in spans))


def assign(requests: list[RequestState], max_prefill_tokens: int) -> None:
    """Size the next chunk of each request still prefilling: the step's budget of `max_prefill_tokens` less the
    tokens of each decoding request (one, and its drafts), shared in batch order, at least one token each (one
    prefilling request gets max_prefill_tokens minus one per other request, as LoRAX does)."""
    prefilling = [r for r in requests if r.prefilling]
    left = max_prefill_tokens - sum(1 + len(r.drafts) for r in requests if not r.prefilling)
    for k, r in enumerate(prefilling):
        reserve = len(prefilling) - k - 1  # one token for each prefilling request after this one
        r.chunk = max(1, min(r.prompt_len - r.n_cached, left - reserve))
        left -= r.chunk


def gather_logprobs(r: RequestState, rows: torch.Tensor, s: RowSpan, n_real_vocab: int) -> None:
    """Append the log-probs of the prompt tokens a chunk's logits rows [stop - start, V] give. Row t predicts
    token t + 1: the chunk's first token takes the previous chunk's last row (kept in r.last_row), and the
    prompt's first computed token has none (NaN), as in an unchunked prefill."""
    ids = r.ids[s.start : s.stop]
    if r.last_row is not None:
        prev = torch.tensor([r.ids[s.start - 1], *ids])
        lps = prefill_logprobs(torch.cat([r.last_row[None], rows]), prev, n_real_vocab)[1:]
    else:
        lps = prefill_logprobs(rows, torch.tensor(ids), n_real_vocab)
    r.prompt_logprobs += lps.tolist()
    r.last_row = rows[-1].clone() if s.stop < r.prompt_len else None
