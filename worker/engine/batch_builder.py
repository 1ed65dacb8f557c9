"""BatchBuilder: a protobuf Batch validated entirely, then turned into a Batch (engine/batch.py).

Every request is checked before any KV block is taken, so a rejected Prefill leaves the shard as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from worker.engine.batch import AdapterLookup, Batch, RequestState, prompt_ids
from worker.engine.grammar import Grammars
from worker.engine.kv_cache import BlockAllocator
from worker.engine.sampling import BatchSampler, SamplingParams
from worker.engine.stopping import StoppingCriteria
from worker.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from worker.layers.rotary import ntk_alpha
from worker.tokenizer import IncrementalDetokenizer, QwenTokenizer


@dataclass
class RequestPlan:
    """A validated request, before any KV block is taken."""

    ids: list[int]  # prompt ids after truncation
    sampling: SamplingParams
    stopping: StoppingCriteria
    own_blocks: int  # blocks to take from the shard's allocator (0: the router gave blocks)
    grammar: str | None = None  # llguidance grammar of the request's JSON schema, checked
    chunk: int = 0  # prompt tokens the first forward computes


@dataclass(kw_only=True)
class BatchBuilder:
    """Turns a protobuf Batch into a Batch, validating every field first."""

    tokenizer: QwenTokenizer
    vocab_size: int  # logits width
    seq_length: int
    use_dynamic_ntk: bool
    block_size: int
    router_blocks: int  # blocks [0, router_blocks) belong to the router
    allocator: BlockAllocator  # the shard's own blocks, after the router's
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    adapters: AdapterLookup | None = None
    max_batch_size: int = 0  # 0: no limit
    chunked_prefill: bool = False
    live_request_ids: set[int] = field(default_factory=set)
    seed_nonce: int = 0  # identical on every rank: unseeded sampling draws the same seed on all shards
    grammars: Grammars | None = None  # None: JSON schemas are refused (FailedPrecondition)

    def build(self, pb_batch: Any) -> Batch:
        if self.max_batch_size and len(pb_batch.requests) > self.max_batch_size:
            raise ResourceExhausted(
                f"batch of {len(pb_batch.requests)} requests exceeds --max-batch-size {self.max_batch_size}"
            )
        if not pb_batch.requests:
            raise InvalidArgument(f"batch {pb_batch.id} has no requests")
        seen: set[int] = set()
        plans: list[RequestPlan] = []
        for req in pb_batch.requests:
            if req.id in seen or req.id in self.live_request_ids:
                raise InvalidArgument(f"duplicate request id {req.id}: already in this or a live batch")
            seen.add(req.id)
            plans.append(self._plan(req))
        own_blocks_needed = sum(p.own_blocks for p in plans)
        if own_blocks_needed > self.allocator.free:
            raise ResourceExhausted(
                f"not enough KV space: the batch needs {own_blocks_needed} self-allocated "
                f"blocks of {self.block_size} tokens, {self.allocator.free} are free"
            )
        requests = []
        for req, plan in zip(pb_batch.requests, plans):
            ids = plan.ids
            if plan.own_blocks:
                blocks = self.allocator.allocate(plan.own_blocks)
                total = len(ids) + plan.stopping.max_new_tokens - 1
                slots = [b * self.block_size + j for b in blocks for j in range(self.block_size)][: max(total, 1)]
            else:
                blocks, slots = list(req.blocks), list(req.slots)
            requests.append(
                RequestState(
                    id=req.id,
                    prompt_len=len(ids),
                    ids=ids,
                    n_cached=req.cache_len,
                    blocks=blocks,
                    slots=slots,
                    owns_blocks=bool(plan.own_blocks),
                    ntk_alpha=ntk_alpha(len(ids), self.seq_length, self.use_dynamic_ntk),
                    params=plan.sampling,
                    stopping=plan.stopping,
                    detok=IncrementalDetokenizer(self.tokenizer, skip_special_tokens=False),
                    adapter_index=req.adapter_index,
                    prefill_logprobs=req.prefill_logprobs,
                    report=req.id % self.world_size == self.rank,
                    prefill_cache_len=req.cache_len,
                    grammar=self.grammars.compile(plan.grammar) if self.grammars and plan.grammar else None,
                    chunk=plan.chunk,
                )
            )
        sampler = BatchSampler([p.sampling for p in plans], self.vocab_size, self.tokenizer.n_real_vocab, self.device)
        return Batch(pb_batch.id, requests, sampler)

    def _plan(self, req: Any) -> RequestPlan:
        """Validate one request."""
        ids = prompt_ids(self.tokenizer, req)
        p = req.parameters
        if p.watermark:
            raise FailedPrecondition(f"request {req.id}: watermarking is not supported by this worker")
        grammar = self._grammar(req.id, p.schema) if p.HasField("schema") and p.schema else None
        sp = SamplingParams(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            do_sample=p.do_sample,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            return_k_alternatives=p.return_k_alternatives,
        )
        try:
            sp.validate()
        except ValueError as exc:
            raise InvalidArgument(f"request {req.id}: {exc}") from exc
        if not sp.is_greedy and sp.seed == 0:  # reported back in GeneratedText.seed
            sp.seed = ((self.seed_nonce ^ (req.id * 0x9E3779B97F4A7C15)) & (2**63 - 1)) | 1
        s = req.stopping_parameters
        if s.max_new_tokens < 1:
            raise InvalidArgument(
                f"request {req.id}: stopping_parameters.max_new_tokens must be >= 1, got {s.max_new_tokens}"
            )
        stop = StoppingCriteria(
            max_new_tokens=s.max_new_tokens,
            stop_sequences=list(s.stop_sequences),
            ignore_eos_token=s.ignore_eos_token,
            eos_ids=self.tokenizer.eos_token_ids,
        )
        if req.adapter_index and (self.adapters is None or not self.adapters.has(req.adapter_index)):
            raise NotFound(f"request {req.id}: adapter index {req.adapter_index} is not loaded on this shard")
        if req.cache_len >= len(ids):
            raise InvalidArgument(
                f"request {req.id}: cache_len {req.cache_len} must be smaller than the prompt "
                f"({len(ids)} tokens): at least one token is computed"
            )
        chunk = self._chunk(req, len(ids) - req.cache_len)
        needed = len(ids) + s.max_new_tokens - 1  # KV slots the request will write
        if not req.blocks:
            if req.slots:
                raise InvalidArgument(f"request {req.id}: slots given without blocks")
            if req.cache_len:
                raise InvalidArgument(f"request {req.id}: cache_len needs router-allocated blocks")
            n_own = math.ceil(needed / self.block_size)
            if n_own > self.allocator.count:
                raise ResourceExhausted(
                    f"request {req.id}: prompt of {len(ids)} tokens + {s.max_new_tokens} new "
                    f"tokens needs {needed} KV slots, more than the shard's "
                    f"{self.allocator.count * self.block_size} self-allocatable slots"
                )
            return RequestPlan(ids, sp, stop, n_own, grammar, chunk)
        bad_blocks = [b for b in req.blocks if b >= self.router_blocks]
        if bad_blocks:
            raise InvalidArgument(
                f"request {req.id}: block {bad_blocks[0]} is out of range (the router owns "
                f"blocks 0..{self.router_blocks - 1})"
            )
        if len(req.slots) < needed:
            raise InvalidArgument(
                f"request {req.id}: {len(req.slots)} slots for {needed} tokens "
                f"(prompt {len(ids)} + max_new_tokens {s.max_new_tokens} - 1)"
            )
        allowed = set(req.blocks)
        bad_slots = [sl for sl in req.slots if sl // self.block_size not in allowed]
        if bad_slots:
            raise InvalidArgument(f"request {req.id}: slot {bad_slots[0]} lies outside the request's blocks")
        return RequestPlan(ids, sp, stop, 0, grammar, chunk)

    def _chunk(self, req: Any, remaining: int) -> int:
        """Prompt tokens the first forward computes: chunk_len when given (LoRAX: the router cut the prompt to
        its prefill budget), else all `remaining`."""
        if not req.HasField("chunk_len") or req.chunk_len >= remaining:
            return remaining
        if not self.chunked_prefill:
            raise FailedPrecondition(
                f"request {req.id}: chunk_len {req.chunk_len} asks for chunked prefill, "
                "which this worker does not offer (Info.chunked_prefill=false)"
            )
        if req.chunk_len == 0:
            raise InvalidArgument(f"request {req.id}: chunk_len 0 computes nothing (at least one token per chunk)")
        return int(req.chunk_len)

    def _grammar(self, request_id: int, schema: str) -> str:
        """A request's JSON schema, checked (the compile starts once the whole batch is valid)."""
        if self.grammars is None:
            raise FailedPrecondition(f"request {request_id}: JSON-schema constrained decoding is not enabled")
        try:
            return self.grammars.check(schema)
        except InvalidArgument as exc:
            raise InvalidArgument(f"request {request_id}: {exc}") from exc
