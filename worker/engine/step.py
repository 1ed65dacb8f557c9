"""One generation step of a batch, in two halves: `compute` (the forward of every row's span, and the tokens
of the rows that sample) changes no request state but the KV cache; `apply` appends the tokens, runs the stop
checks and builds this shard's Generations.

Rows of one step may mix decode tokens and prompt chunks (engine/chunks.py). A row still prefilling after
this step samples nothing and gets no Generation; its prefill logprobs are gathered and go out with its first
token. Every rank computes every row; the sampled ids are rank 0's, so the ranks' states never drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.distributed import ParallelContext
from worker.engine import chunks, lookahead
from worker.engine.batch import Adapters, Batch, RequestState
from worker.engine.generations import Generation, Tokens, alternatives, generated_text, next_token, prompt_text
from worker.engine.grammar import Grammars
from worker.engine.runner import Runner, StepLogits
from worker.engine.sampling import SampleOutput
from worker.engine.stopping import FinishReason
from worker.tokenizer import QwenTokenizer


@dataclass
class Computed:
    plan: chunks.StepPlan
    logits: StepLogits
    sampled: SampleOutput | None  # rows plan.sampling, in order (None: no row samples)
    next_ids: list[int]  # the sampled token of each row of plan.sampling, identical on every rank


def compute(
    batch: Batch, runner: Runner, pctx: ParallelContext, grammars: Grammars, adapters: Adapters | None
) -> Computed:
    """The step's forward and samples; no request state changes (n_cached aside, which the caller restores on
    failure)."""
    plan = chunks.plan(batch)
    reqs = batch.requests
    adapter_slots = adapters.request_slots(batch) if adapters is not None else None
    rows = plan.sampling
    masks = grammars.start_masks([reqs[i].grammar for i in rows])  # None unless one is constrained
    spans = plan.spans if plan.prefill else None  # a pure decode may replay a CUDA graph
    step = lookahead.step_logits(runner, batch, plan.prefill, adapter_slots, spans)
    if not rows:
        return Computed(plan, step, None, [])
    if len(rows) == len(reqs):
        sampler, last = batch.sampler, step.last
    else:  # the filtered sampler shares the rows' generators: their seeded streams continue
        sampler, last = batch.sampler.filter(rows), step.last[torch.tensor(rows, device=step.last.device)]
    out = sampler(last, [reqs[i].ids for i in rows], masks.result() if masks else None)
    next_ids = pctx.broadcast(out.next_ids.clone()).tolist()  # identical tokens on every rank
    return Computed(plan, step, out, next_ids)


def apply(batch: Batch, c: Computed, tok: QwenTokenizer) -> list[Generation]:
    """Advance each row past its span, append the sampled tokens, check the stops; this shard's generations."""
    reqs = batch.requests
    for i, (r, s) in enumerate(zip(reqs, c.plan.spans)):
        if r.prefilling and r.prefill_logprobs and r.report:
            chunks.gather_logprobs(r, c.logits.prompt[i], s, tok.n_real_vocab)
        r.n_cached = s.stop
    if c.sampled is None:
        return []
    logprobs = c.sampled.logprobs.tolist()
    generations = []
    for j, i in enumerate(c.plan.sampling):
        r = reqs[i]
        first = r.prefilling
        tid = c.next_ids[j]
        r.ids.append(tid)
        text = r.detok.add(tid)
        reason = r.stopping.check(tid, r.detok.text, r.n_generated)
        if r.grammar is not None and r.grammar.consume(tid):  # the schema's output is whole: it ends here
            reason = FinishReason.FINISH_REASON_EOS_TOKEN
        if reason is not None:
            r.finished = True
        if not r.report:
            continue
        alts = []
        if r.params.return_k_alternatives:
            alts = [alternatives(tok, c.sampled.top_ids[j], c.sampled.top_logprobs[j])]
        done = None
        if reason is not None:
            seed = None if r.params.is_greedy else batch.sampler.seeds[i]
            done = generated_text(tok, r.ids[r.prompt_len :], reason, seed)
        generations.append(
            Generation(
                request_id=r.id,
                next_tokens=next_token(tok, tid, logprobs[j], text, alts),
                prefill_tokens=_prompt(tok, r) if first and r.prefill_logprobs else None,
                prefill_tokens_length=r.prompt_len - r.prefill_cache_len if first else 0,
                generated_text=done,
            )
        )
    return generations


def _prompt(tok: QwenTokenizer, r: RequestState) -> Tokens:
    """The prompt tokens computed for the request (after its cache_len) with the logprobs of all its chunks."""
    lps, r.prompt_logprobs = r.prompt_logprobs, []
    return prompt_text(tok, r.ids[r.prefill_cache_len : r.prompt_len], lps)
