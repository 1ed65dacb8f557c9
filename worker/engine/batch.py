"""Batch state and the router contract on it: concatenate, filter, info (the CachedBatch the router sees).

Plain Python plus the per-request sampler state; no forward pass. engine/batch_builder.py builds a Batch from
a protobuf Batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from worker.engine.generations import CachedBatchInfo
from worker.engine.grammar import Grammar
from worker.engine.prompt_lookup import PromptLookup
from worker.engine.sampling import BatchSampler, SamplingParams
from worker.engine.stopping import StoppingCriteria
from worker.errors import InvalidArgument, NotFound
from worker.tokenizer import IncrementalDetokenizer, QwenTokenizer


@dataclass(frozen=True)
class Ahead:
    """A request's next-step logits computed ahead: row `row` of `logits`, valid while len(ids) == length."""

    logits: torch.Tensor  # [n, V]: the whole look-ahead's output, shared by its requests
    row: int
    length: int


@dataclass
class RequestState:
    id: int
    prompt_len: int  # prompt tokens after truncation
    ids: list[int]  # prompt + generated ids
    n_cached: int  # leading ids whose K/V are in the cache
    blocks: list[int]  # KV blocks in order
    slots: list[int]  # one KV slot per token position
    owns_blocks: bool  # True: blocks come from the shard's own allocator (request came without blocks)
    ntk_alpha: float  # dynamic-NTK alpha fixed at prefill from the whole prompt's length
    params: SamplingParams
    stopping: StoppingCriteria
    detok: IncrementalDetokenizer
    adapter_index: int
    prefill_logprobs: bool
    report: bool  # this shard answers this request's generations (id % world_size == rank)
    prefill_cache_len: int = 0  # cache_len the request arrived with
    finished: bool = False
    ahead: Ahead | None = None  # the next decode step's logits, computed ahead (worker/engine/lookahead.py)
    grammar: Grammar | None = None  # JSON-schema constrained decoding: the request's matcher (engine/grammar.py)
    chunk: int = 0  # prompt tokens the next forward computes while prefilling (engine/chunks.py)
    prompt_logprobs: list[float] = field(default_factory=list)  # prefill logprobs gathered over the chunks so far
    last_row: torch.Tensor | None = None  # [V] the previous chunk's last logits (prefill logprobs only)
    drafts: list[int] = field(default_factory=list)  # speculative tokens the next forward verifies
    lookup: PromptLookup | None = None  # prompt-lookup drafting state (engine/prompt_lookup.py)
    skipped: int = 0  # accepted tokens after the first of each step so far (GeneratedText.skipped_tokens)

    @property
    def n_generated(self) -> int:
        return len(self.ids) - self.prompt_len

    @property
    def prefilling(self) -> bool:
        """No token sampled yet: the next forward computes (a chunk of) the prompt."""
        return len(self.ids) == self.prompt_len

    @property
    def next_tokens(self) -> int:
        """Tokens this request adds to the next forward."""
        return self.chunk if self.prefilling else 1 + len(self.drafts)


@dataclass
class Batch:
    id: int
    requests: list[RequestState]
    sampler: BatchSampler

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    @property
    def max_tokens(self) -> int:
        """KV token slots the batch holds."""
        return sum(len(r.slots) for r in self.requests)

    def info(self) -> CachedBatchInfo:
        return CachedBatchInfo(
            id=self.id,
            request_ids=self.request_ids,
            size=len(self.requests),
            max_tokens=self.max_tokens,
            current_tokens=sum(r.next_tokens for r in self.requests),
        )

    def to_pb(self, pb: Any) -> Any:
        """info() as a pb.CachedBatch (pb: the generate_pb2 module), for tests that drive the engine directly;
        the server converts in worker/wire.py."""
        return pb.CachedBatch(**asdict(self.info()))

    def filter(self, request_ids: list[int]) -> tuple[Batch, list[RequestState]]:
        """Keep `request_ids` in that order; returns the new batch and the dropped requests."""
        index = {r.id: i for i, r in enumerate(self.requests)}
        missing = [rid for rid in request_ids if rid not in index]
        if missing:
            raise NotFound(f"request ids {missing} are not in batch {self.id}")
        if len(set(request_ids)) != len(request_ids):
            raise InvalidArgument(f"FilterBatch lists a request id twice: {request_ids}")
        keep = [index[rid] for rid in request_ids]
        kept = set(keep)
        dropped = [r for i, r in enumerate(self.requests) if i not in kept]
        return Batch(self.id, [self.requests[i] for i in keep], self.sampler.filter(keep)), dropped

    @staticmethod
    def concatenate(batches: list[Batch]) -> Batch:
        """One batch holding all requests in order; keeps the first batch's id."""
        return Batch(
            batches[0].id,
            [r for b in batches for r in b.requests],
            BatchSampler.concatenate([b.sampler for b in batches]),
        )


def prompt_ids(tokenizer: QwenTokenizer, req: Any) -> list[int]:
    """A request's prompt ids (tokenized_inputs, else its text encoded), validated, then truncated."""
    ids = (
        list(req.tokenized_inputs.ids)
        if req.HasField("tokenized_inputs") and req.tokenized_inputs.ids
        else (tokenizer.encode(req.inputs) if req.inputs else [])
    )
    if not ids:
        raise InvalidArgument(f"request {req.id}: empty prompt (no inputs text and no tokenized ids)")
    bad = [t for t in ids if t >= tokenizer.n_real_vocab]
    if bad:
        raise InvalidArgument(
            f"request {req.id}: token id {bad[0]} is not a valid token "
            f"(the vocabulary has {tokenizer.n_real_vocab} tokens)"
        )
    if req.truncate and len(ids) > req.truncate:
        ids = ids[-req.truncate :]
    return ids


class AdapterLookup(Protocol):
    def has(self, adapter_index: int) -> bool: ...


class Adapters(AdapterLookup, Protocol):
    """What the engine and the runner use of the adapter manager."""

    def request_slots(self, batch: Batch) -> list[int] | None: ...  # per request its pool slot; None: no adapters

    def wait_pinned(self) -> None: ...
