"""One generation step of a batch, in two halves: `compute` (the forward of every row's span, and the tokens
of the rows that sample) changes no request state but the KV cache; `apply` appends the tokens, runs the stop
checks and builds this shard's Generations.

Rows of one step may mix decode tokens, prompt chunks (engine/chunks.py) and verify rows (a decode token and
its drafts, engine/speculative.py: such a row yields 1 + its accepted drafts tokens). A row still prefilling
after this step samples nothing and gets no Generation; its prefill logprobs are gathered and go out with its
first token. Every rank computes every row; the chosen ids are rank 0's, so the ranks' states never drift.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import torch

from worker.distributed import ParallelContext
from worker.engine import chunks, lookahead, speculative
from worker.engine.batch import Adapters, Batch, RequestState
from worker.engine.generations import Generation, Tokens, alternatives, generated_text, next_tokens, prompt_text
from worker.engine.grammar import Grammars
from worker.engine.runner import Runner, StepLogits
from worker.engine.sampling import BatchSampler
from worker.engine.speculative import Choice
from worker.engine.stopping import FinishReason
from worker.tokenizer import QwenTokenizer


@dataclass
class Computed:
    plan: chunks.StepPlan
    logits: StepLogits
    choices: list[Choice]  # per row of plan.sampling, in order: its tokens, identical on every rank
    medusa: list[list[int]]  # per row of plan.sampling: the Medusa heads' drafts for its next step ([]: none)
    fed: bool = False  # the next step's forward was launched with this step's tokens (lookahead.prepare_fed)


class _Positions(Sequence[torch.Tensor]):
    """Per sampling row, the logits of its positions: a verify row's prompt rows, else its last row [1, V].
    Sliced when read: a plain decode step reads none (the chooser takes the last logits whole)."""

    def __init__(self, logits: StepLogits, spans: Sequence[chunks.RowSpan], rows: list[int]):
        self.logits, self.spans, self.rows = logits, spans, rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, k: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[torch.Tensor]: ...
    def __getitem__(self, k: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        i = self.rows[k]
        return self.logits.prompt[i] if self.spans[i].drafts else self.logits.last[i : i + 1]


def compute(
    batch: Batch,
    runner: Runner,
    pctx: ParallelContext,
    grammars: Grammars,
    adapters: Adapters | None,
    medusa: bool = False,
    ahead: Callable[[Batch], lookahead.Feed | None] | None = None,
) -> Computed:
    """The step's forward and choices; no request state changes (n_cached and look-ahead rows aside: the caller
    restores n_cached on failure). medusa: Medusa heads are attached, so the forward also returns their logits
    (eager path). ahead: for a plain decode step (every row samples one token, no verify row, no heads), the
    fed look-ahead of the batch, whose feed gets the chosen ids before the host waits for them."""
    plan = chunks.plan(batch)
    reqs = batch.requests
    adapter_slots = adapters.request_slots(batch) if adapters is not None else None
    rows = plan.sampling
    masks = grammars.start_masks([reqs[i].grammar for i in rows])  # None unless one is constrained
    spans_path = plan.prefill or plan.verify  # multi-token rows; a pure decode may replay a CUDA graph
    spans = plan.spans if spans_path else None
    medusa = medusa and len(reqs) <= chunks.MAX_VERIFY_ROWS  # larger batches decode plainly (CUDA graphs)
    step = lookahead.step_logits(runner, batch, spans_path, adapter_slots, spans, speculative=medusa)
    if not rows:
        return Computed(plan, step, [], [])
    # the filtered sampler shares the rows' generators: their seeded streams continue
    sampler = batch.sampler if len(rows) == len(reqs) else batch.sampler.filter(rows)
    positions = _Positions(step, plan.spans, rows)
    drafts = [plan.spans[i].drafts for i in rows]
    allowed = masks.result() if masks else None
    first = None  # without verify rows, round 0 reads the last logits as they are (no copy)
    if not plan.verify:
        first = step.last if len(rows) == len(reqs) else step.last[torch.tensor(rows, device=step.last.device)]
    plain = first is not None and len(rows) == len(reqs) and step.speculative is None and not plan.prefill
    feed = ahead(batch) if ahead is not None and plain else None
    if feed is not None and first is not None:
        choices, fed = _choose_and_feed(sampler, first, [r.ids for r in reqs], allowed, pctx, feed)
        return Computed(plan, step, choices, [[] for _ in rows], fed)
    choices = speculative.choose(sampler, positions, drafts, [reqs[i].ids for i in rows], allowed, pctx, first)
    heads: list[list[int]] = [[] for _ in rows]
    if step.speculative is not None:  # drafts from the heads at each row's last chosen position
        at = [c.accepted if d else -1 for c, d in zip(choices, drafts)]
        spec = [step.speculative[i] for i in rows]
        heads = speculative.medusa_drafts(spec, at, batch.sampler.n_real_vocab, pctx)
    return Computed(plan, step, choices, heads)


def _choose_and_feed(
    sampler: BatchSampler,
    logits: torch.Tensor,
    prev_ids: list[list[int]],
    allowed: torch.Tensor | None,
    pctx: ParallelContext,
    feed: lookahead.Feed,
) -> tuple[list[Choice], bool]:
    """speculative.choose for a step without drafts (one sampler call, rank 0's ids), whose ids go to `feed` on
    the device before the host reads them; whether the feed launched its forward. The ids and logprobs are
    copied to the host before the forward is queued: reading them waits for the sampler, not for the forward."""
    out = sampler(logits, prev_ids, allowed)
    ids = pctx.broadcast(out.next_ids.clone()) if pctx.world_size > 1 else out.next_ids
    chosen = _to_host(ids, out.logprobs)
    fed = feed(ids)
    host_ids, logprobs = chosen()
    picked = zip(host_ids, logprobs, out.top_ids, out.top_logprobs)
    return [Choice([i], [lp], [t], [tl]) for i, lp, t, tl in picked], fed


def _to_host(*tensors: torch.Tensor) -> Callable[[], list[list]]:
    """Start copying 1-d tensors to the host now; the returned call gives their lists once these copies are done,
    not waiting for the work queued on the stream after them (a CUDA event marks the copies' end)."""
    if not tensors[0].is_cuda:
        values = [t.tolist() for t in tensors]
        return lambda: values
    host = [t.to("cpu", non_blocking=True) for t in tensors]  # into pinned memory: the copies are asynchronous
    done = torch.cuda.Event()
    done.record()

    def wait() -> list[list]:
        done.synchronize()
        return [h.tolist() for h in host]

    return wait


@dataclass
class Report:
    """What one row's Generation needs, taken when the step is applied; `generations` builds it later (after
    the next forward is launched, so that the texts and dataclasses do not hold the device idle)."""

    r: RequestState
    choice: Choice
    kept: int  # tokens kept: the first stop ends the step's tokens
    texts: list[str]
    first: bool  # the request's first token: its prefill tokens go with it
    reason: FinishReason | None
    seed: int | None
    skipped: int


def apply(batch: Batch, c: Computed, tok: QwenTokenizer, setting: speculative.Speculation) -> list[Report]:
    """Advance each row past its span, append its chosen tokens up to the first stop, check the stops, set the
    next step's drafts; what this shard's generations need (`generations` builds them)."""
    reqs = batch.requests
    for i, (r, s) in enumerate(zip(reqs, c.plan.spans)):
        if r.prefilling and r.prefill_logprobs and r.report:
            chunks.gather_logprobs(r, c.logits.prompt[i], s, tok.n_real_vocab)
        r.n_cached = s.stop
    reports = []
    # drafts only for a batch that verifies them (chunks.MAX_VERIFY_ROWS): no lookup pass per row beyond it
    drafting = (setting.lookup_tokens > 0 or any(c.medusa)) and len(reqs) <= chunks.MAX_VERIFY_ROWS
    for j, i in enumerate(c.plan.sampling):
        r, choice, drafts = reqs[i], c.choices[j], c.plan.spans[i].drafts
        first = r.prefilling
        if r.lookup is not None and drafts and not c.medusa[j]:
            r.lookup.record(r.id, len(drafts), choice.accepted)
        kept, texts, reason = _append(r, choice.ids)
        r.n_cached = len(r.ids) - 1  # the accepted drafts' K/V are in the cache; the last token's is not
        r.skipped += kept - 1
        r.drafts = speculative.next_drafts(r, c.medusa[j], setting) if drafting else []
        if r.report:
            seed = None if reason is None or r.params.is_greedy else batch.sampler.seeds[i]
            reports.append(Report(r, choice, kept, texts, first, reason, seed, r.skipped))
    return reports


def generations(tok: QwenTokenizer, reports: list[Report]) -> list[Generation]:
    """The Generations of `apply`'s reports. Reads only what no later step has changed yet: the request's ids
    up to its stop (a finished request gets no more) and its prompt logprobs (taken here)."""
    out = []
    for p in reports:
        r, choice, kept = p.r, p.choice, p.kept
        alts = []
        if r.params.return_k_alternatives:
            alts = [alternatives(tok, ids, lps) for ids, lps in zip(choice.top_ids[:kept], choice.top_logprobs)]
        done = None
        if p.reason is not None:
            done = generated_text(tok, r.ids[r.prompt_len :], p.reason, p.seed, p.skipped)
        out.append(
            Generation(
                request_id=r.id,
                next_tokens=next_tokens(tok, choice.ids[:kept], choice.logprobs[:kept], p.texts, alts),
                prefill_tokens=_prompt(tok, r) if p.first and r.prefill_logprobs else None,
                prefill_tokens_length=r.prompt_len - r.prefill_cache_len if p.first else 0,
                generated_text=done,
            )
        )
    return out


def _append(r: RequestState, ids: list[int]) -> tuple[int, list[str], FinishReason | None]:
    """Append the step's tokens in order, checking the stops after each: the tokens after the first stop are
    dropped. Returns the tokens kept, their texts and the stop reason (None: the request goes on)."""
    texts = []
    for tid in ids:
        r.ids.append(tid)
        texts.append(r.detok.add(tid))
        reason = r.stopping.check(tid, r.detok.text, r.n_generated)
        if r.grammar is not None and r.grammar.consume(tid):  # the schema's output is whole: it ends here
            reason = FinishReason.FINISH_REASON_EOS_TOKEN
        if reason is not None:
            r.finished = True
            return len(texts), texts, reason
    return len(texts), texts, None


def _prompt(tok: QwenTokenizer, r: RequestState) -> Tokens:
    """The prompt tokens computed for the request (after its cache_len) with the logprobs of all its chunks."""
    lps, r.prompt_logprobs = r.prompt_logprobs, []
    return prompt_text(tok, r.ids[r.prefill_cache_len : r.prompt_len], lps)
