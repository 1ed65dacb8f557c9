"""Helpers of the speculative-decoding tests: an engine with or without drafts, a run of requests to the end
with everything their Generations said, and a spy on the verify rows (drafts proposed, accepted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from pb_requests import NEUTRAL as NEUTRAL  # the speculative tests import both from here
from pb_requests import greedy_request as greedy_request
from worker.distributed import ParallelContext
from worker.engine import step
from worker.engine.batch import Batch
from worker.engine.engine import Engine, EngineConfig
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer


def engine(
    model: FlashQwenForCausalLM,
    tok: QwenTokenizer,
    n: int,
    pctx: ParallelContext | None = None,
    tokens: int = 8192,
    **cfg: Any,
) -> Engine:
    """An engine on `model` drafting n tokens per step by prompt lookup (0: no speculation) with a KV cache of
    `tokens` slots, half of them the router's."""
    config = EngineConfig(**{"shard_block_fraction": 0.5, "cuda_graphs": False, **cfg}, speculative_tokens=n)
    e = Engine(model, tok, pctx or ParallelContext(), config)
    e.allocate_cache(tokens // config.block_size)
    return e


@dataclass
class Seen:
    """Everything the Generations of a run said, per request id."""

    steps: dict[int, list[list[int]]] = field(default_factory=dict)  # the tokens of each Generation
    logprobs: dict[int, list[float]] = field(default_factory=dict)
    alternatives: dict[int, list[list[int]]] = field(default_factory=dict)  # per token, the alternatives' ids
    texts: dict[int, str] = field(default_factory=dict)  # the Generations' texts, joined
    done: dict[int, Any] = field(default_factory=dict)  # GeneratedText
    prompt: dict[int, list[float]] = field(default_factory=dict)  # prefill logprobs (NaN first)

    def tokens(self, rid: int) -> list[int]:
        return [t for s in self.steps[rid] for t in s]

    def add(self, generations: list[Any]) -> None:
        for g in generations:
            t = g.next_tokens
            assert len(t.ids) == len(t.logprobs) == len(t.texts) == len(t.is_special) >= 1
            self.steps.setdefault(g.request_id, []).append(list(t.ids))
            self.logprobs.setdefault(g.request_id, []).extend(t.logprobs)
            self.texts[g.request_id] = self.texts.get(g.request_id, "") + "".join(t.texts)
            alts = self.alternatives.setdefault(g.request_id, [])
            alts += [list(a.ids) for a in t.alternative_tokens]
            if g.generated_text is not None:
                self.done[g.request_id] = g.generated_text
            if g.prefill_tokens is not None:
                self.prompt[g.request_id] = list(g.prefill_tokens.logprobs)


def run(e: Engine, requests: list[Any], seen: Seen | None = None, batch_id: int = 1) -> Seen:
    """Prefill `requests` as one batch and decode it to the end."""
    seen = seen or Seen()
    gens, batch = e.prefill(pb.Batch(id=batch_id, requests=requests), None)
    seen.add(gens)
    return finish(e, seen, batch)


def finish(e: Engine, seen: Seen, batch: Batch | None) -> Seen:
    """Decode `batch` to the end."""
    while batch is not None:
        gens, batch = e.decode([batch.info()])
        seen.add(gens)
    assert e.batches == {}
    return seen


def live(seen: Seen, step: tuple[list[Any], Batch | None]) -> Batch:
    """Record a step's generations; the batch it leaves (one is expected)."""
    gens, batch = step
    seen.add(gens)
    assert batch is not None
    return batch


@dataclass
class Spy:
    """Drafts verified and accepted over the steps the engine computed (through step.compute)."""

    proposed: int = 0
    accepted: int = 0
    choices: list[tuple[int, list[int]]] = field(default_factory=list)  # (request id, chosen ids) per sampling row

    @classmethod
    def on(cls, monkeypatch: pytest.MonkeyPatch) -> Spy:
        spy = cls()
        compute = step.compute

        def wrapped(batch: Any, *args: Any, **kw: Any) -> step.Computed:
            c = compute(batch, *args, **kw)
            for j, i in enumerate(c.plan.sampling):
                drafts = c.plan.spans[i].drafts
                spy.proposed += len(drafts)
                spy.accepted += c.choices[j].accepted
                spy.choices.append((batch.requests[i].id, list(c.choices[j].ids)))
            return c

        monkeypatch.setattr(step, "compute", wrapped)
        return spy


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and bool(torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol, rtol=0))
