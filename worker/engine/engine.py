"""The shard's state machine: live batches and one generation step (the runner owns the KV cache).

Every shard runs every batch (same sampling, same stop checks) so their states never drift; a shard
reports generations only for its own requests (`request.id % world_size == rank`). Calls are serialised
by the server; nothing here is thread-safe on its own. Requests come in as protobuf messages (read here
and in BatchBuilder); results go out as the dataclasses of worker/engine/generations.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from worker.distributed import ParallelContext
from worker.engine import chunks, lookahead, step
from worker.engine.batch import Adapters, Batch, RequestState, prompt_ids
from worker.engine.batch_builder import BatchBuilder
from worker.engine.config import EngineConfig
from worker.engine.generations import Generation
from worker.engine.grammar import Grammars
from worker.engine.kv_cache import BlockAllocator, KVCache
from worker.engine.runner import Runner
from worker.engine.speculative import Speculation, check_tokens
from worker.engine.warmup import kv_blocks, warmup_prefill
from worker.errors import InvalidArgument, NotFound
from worker.models.qwen import FlashQwenForCausalLM
from worker.tokenizer import QwenTokenizer

if TYPE_CHECKING:
    from worker.pb import generate_pb2 as pb

__all__ = ["Engine", "EngineConfig"]
log = logging.getLogger(__name__)


class BatchRef(Protocol):
    """A cached batch named in a request (pb.CachedBatch or CachedBatchInfo): only its id is read."""

    @property
    def id(self) -> int: ...


class Engine:
    def __init__(
        self,
        model: FlashQwenForCausalLM,
        tokenizer: QwenTokenizer,
        pctx: ParallelContext,
        cfg: EngineConfig,
        adapters: Adapters | None = None,
    ):
        check_tokens(cfg.speculative_tokens)
        self.model = model
        self.tokenizer = tokenizer
        self.pctx = pctx
        self.cfg = cfg
        self.adapters = adapters
        self.batches: dict[int, Batch] = {}
        self.grammars = Grammars(tokenizer)  # JSON-schema constrained decoding; built up at the first schema
        self.runner: Runner | None = None  # owns the KV cache; built on first use or by Warmup
        self.allocator: BlockAllocator | None = None
        self.router_blocks = 0
        self.max_supported_total_tokens = 0
        self.calibrated_kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # from Warmup (fp8 KV)
        self.max_prefill_tokens = cfg.max_prefill_tokens  # prefill tokens per step (later chunks); Warmup's value
        nonce = torch.randint(1, 2**62, (1,), device=pctx.device)
        self.seed_nonce = int(pctx.broadcast(nonce).item())  # rank 0's, on every rank

    def close(self) -> None:
        """Release the CUDA graphs and the KV cache: called before the process group is destroyed."""
        if self.runner is not None:
            self.runner.release_graphs()
        self.runner = None

    # ------------------------------------------------------------------ KV cache
    @property
    def kv_dtype(self) -> torch.dtype:
        return self.cfg.kv_cache_dtype or self.model.dtype

    @property
    def kv(self) -> KVCache | None:
        return self.runner.kv if self.runner is not None else None

    def allocate_cache(self, num_blocks: int) -> None:
        """A new runner with a KV cache of num_blocks; the router gets all blocks but the shard's share."""
        self.runner = None  # the old cache goes before the new one is allocated
        self.runner = Runner.with_cache(
            self.model, self.pctx, self.cfg, num_blocks, self.calibrated_kv_scales, self.adapters
        )
        assert self.runner.kv is not None
        num_blocks = self.runner.kv.num_blocks
        own = max(2, int(num_blocks * self.cfg.shard_block_fraction))  # incl. the runner's scratch block (the last)
        self.router_blocks = num_blocks - own
        self.allocator = BlockAllocator(self.router_blocks, own - 1)
        self.max_supported_total_tokens = self.router_blocks * self.cfg.block_size
        spec = self.speculation
        log.info(
            "decode look-ahead: %s%s",
            lookahead.describe(
                self.cfg.look_ahead, self.runner.graphs is not None, self.pctx.world_size, self.cfg.look_ahead_fed
            ),
            "; never for a batch with drafts to verify or with Medusa heads attached" if spec.tokens else "",
        )
        log.info("speculative decoding: %s", spec.describe())
        log.info(
            "chunked prefill: %s",
            f"on, later chunks sized to {self.max_prefill_tokens} prefill tokens per step"
            if self.cfg.chunked_prefill
            else "off (--no-chunked-prefill)",
        )
        log.info(
            "KV cache: %d blocks x %d tokens (%s), %d for the router (%d tokens), %d kept by the shard",
            num_blocks,
            self.cfg.block_size,
            self.runner.kv.dtype,
            self.router_blocks,
            self.max_supported_total_tokens,
            own,
        )

    @property
    def speculation(self) -> Speculation:
        """Prompt-lookup drafts from the config, the heads from the model (a Medusa adapter may attach later)."""
        return Speculation(self.cfg.speculative_tokens, self.model.medusa_heads)

    def _ensure_cache(self) -> None:
        if self.runner is None:
            self.allocate_cache(kv_blocks(self.model, self.pctx, self.cfg, activation_peak=None))

    def _blocks_from_memory(self, activation_peak: int) -> int:
        return kv_blocks(self.model, self.pctx, self.cfg, activation_peak)

    # ------------------------------------------------------------------ RPC bodies
    def builder(self) -> BatchBuilder:
        self._ensure_cache()
        assert self.allocator is not None
        live = {rid for b in self.batches.values() for rid in b.request_ids}
        c = self.model.config
        return BatchBuilder(
            tokenizer=self.tokenizer,
            vocab_size=c.vocab_size,
            seq_length=c.seq_length,
            use_dynamic_ntk=c.use_dynamic_ntk,
            block_size=self.cfg.block_size,
            router_blocks=self.router_blocks,
            allocator=self.allocator,
            rank=self.pctx.rank,
            world_size=self.pctx.world_size,
            device=str(self.pctx.device),
            adapters=self.adapters,
            max_batch_size=self.cfg.max_batch_size,
            chunked_prefill=self.cfg.chunked_prefill,
            live_request_ids=live,
            seed_nonce=self.seed_nonce,
            grammars=self.grammars,
        )

    def adapter_pool_changed(self) -> int:
        """The adapter manager re-laid its pools out (more lanes a slot): capture the decode graphs' adapter variants
        again; returns how many (0 without graphs)."""
        graphs = self.runner.graphs if self.runner is not None else None
        if graphs is None or not graphs.has_lora:
            return 0
        try:
            return graphs.recapture_adapters()
        except Exception:
            if self.pctx.world_size > 1:  # the other shards wait in the captures' collectives: leave, do not hang them
                log.critical("capturing the decode graphs with adapters again failed: this shard exits", exc_info=True)
                logging.shutdown()
                os._exit(1)
            # the adapter variants are gone: steps with adapters run eagerly from now on
            log.exception("capturing the decode graphs with adapters again failed: those steps now run eagerly")
            return 0

    def warmup(self, request: pb.WarmupRequest) -> int:
        """Run the router's largest prefill without a cache to find the activation peak (and calibrate fp8
        scales), then size the KV cache from what is left. Returns max_supported_total_tokens. The batch is
        validated before the live batches and the cache are dropped: a refused Warmup changes nothing."""
        lengths, ids = [], []
        for req in request.batch.requests:
            p = prompt_ids(self.tokenizer, req)
            if request.max_input_length:
                p = p[-request.max_input_length :]
            lengths.append(len(p))
            ids += p
        self.clear(None)
        self.runner = self.allocator = None
        self.max_prefill_tokens = request.max_prefill_tokens or self.cfg.max_prefill_tokens
        calibrate = self.kv_dtype == torch.float8_e4m3fn and self.model.checkpoint_kv_scales() is None
        probe = warmup_prefill(self.model, self.pctx, lengths, ids, calibrate, self.cfg.kv_scale_margin)
        if probe.kv_scales is not None:
            self.calibrated_kv_scales = probe.kv_scales
        self.allocate_cache(self._blocks_from_memory(probe.activation_peak))
        return self.max_supported_total_tokens

    def prefill(self, pb_batch: pb.Batch, cached: BatchRef | None) -> tuple[list[Generation], Batch | None]:
        """Build and run a new batch; the batch left to decode. With `cached` and chunked prefill (LoRAX), one
        forward runs the cached batch's next step and the new requests' first chunks, under the cached batch's
        id; a failed forward leaves the cached batch as it was. Without chunked prefill the new batch runs alone
        and then joins the cached one."""
        if pb_batch.id in self.batches:
            raise InvalidArgument(f"batch id {pb_batch.id} is already live on this shard")
        if cached is not None and cached.id not in self.batches:
            raise NotFound(f"cached batch {cached.id} is not on this shard")
        new = self.builder().build(pb_batch)  # validates everything before any state changes
        if cached is not None and self.cfg.chunked_prefill:
            old = self.batches.pop(cached.id)
            generations, batch = self._run(Batch.concatenate([old, new]), keep=old)
        else:
            generations, batch = self._run(new)
            if cached is not None:
                old = self.batches.pop(cached.id)
                batch = Batch.concatenate([old, batch]) if batch is not None else old
        if batch is not None:
            self.batches[batch.id] = batch
        return generations, batch

    def decode(self, cached: Sequence[BatchRef]) -> tuple[list[Generation], Batch | None]:
        """One step of the cached batches, concatenated (chunks continue); the batch left to decode."""
        if not cached:
            raise InvalidArgument("Decode needs at least one cached batch")
        missing = [c.id for c in cached if c.id not in self.batches]
        if missing:
            raise NotFound(f"batch ids {missing} are not on this shard")
        if len({c.id for c in cached}) != len(cached):
            raise InvalidArgument(f"Decode lists a batch twice: {[c.id for c in cached]}")
        batches = [self.batches.pop(c.id) for c in cached]
        generations, batch = self._run(Batch.concatenate(batches) if len(batches) > 1 else batches[0])
        if batch is not None:
            self.batches[batch.id] = batch
        return generations, batch

    def _run(self, batch: Batch, keep: Batch | None = None) -> tuple[list[Generation], Batch | None]:
        """One step. A failure releases the batch's KV blocks and is raised; one in the forward or the sampling
        leaves `keep` (the cached batch of a merged Prefill) live and unchanged. Returns the generations and
        the batch without its finished requests (None if none are left), whose next chunks are then sized and
        whose next forward is started (look-ahead)."""
        saved = [r.n_cached for r in batch.requests]
        try:
            assert self.runner is not None
            heads = self.model.medusa_heads > 0
            fed = self._fed_look_ahead if self._feeds(batch) else None
            computed = step.compute(batch, self.runner, self.pctx, self.grammars, self.adapters, heads, fed)
        except Exception:
            lookahead.clear(batch.requests)
            for r, n in zip(batch.requests, saved):
                r.n_cached = n
            kept = set() if keep is None else {id(r) for r in keep.requests}
            self._release([r for r in batch.requests if id(r) not in kept])
            if keep is not None:
                self.batches[keep.id] = keep
            raise
        try:
            reports = step.apply(batch, computed, self.tokenizer, self.speculation)
        except Exception:
            self._release(batch.requests)
            raise
        survivors = self._drop_finished(batch)
        if survivors is not None:
            chunks.assign(survivors.requests, self.max_prefill_tokens)
            if computed.fed:
                lookahead.settle(survivors.requests)
            else:
                self._look_ahead(survivors)
        try:  # the texts and Generations are built while the look-ahead forward runs
            generations = step.generations(self.tokenizer, reports)
        except Exception:
            self._release(batch.requests)
            raise
        if survivors is not None:
            # The next step's masks: computed here while the look-ahead forward runs on the GPU (no GIL handoff
            # to another thread), else in the background while the step replies and the next Decode arrives.
            ahead = any(r.ahead is not None for r in survivors.requests)
            self.grammars.prefetch([r.grammar for r in survivors.requests], wait=ahead)
        return generations, survivors

    def filter(self, batch_id: int, request_ids: list[int]) -> Batch:
        if batch_id not in self.batches:
            raise NotFound(f"batch id {batch_id} is not on this shard")
        batch, dropped = self.batches[batch_id].filter(request_ids)
        self._release(dropped)
        if batch.requests:
            self.batches[batch_id] = batch
        else:
            del self.batches[batch_id]
        return batch

    def clear(self, batch_id: int | None) -> None:
        ids = list(self.batches) if batch_id is None else [batch_id]
        for bid in ids:
            batch = self.batches.pop(bid, None)
            if batch is not None:
                self._release(batch.requests)

    def stats(self) -> dict[str, int | str]:
        return {
            "kv_cache_dtype": str(self.kv_dtype),  # the router keeps its prefix cache off for an fp8 cache
            "batches": len(self.batches),
            "requests": sum(len(b.requests) for b in self.batches.values()),
            "shard_blocks_free": self.allocator.free if self.allocator else 0,
            "shard_blocks_total": self.allocator.count if self.allocator else 0,
            "router_blocks": self.router_blocks,
        }

    def health(self) -> None:
        """TP=1: a one-token forward gives finite logits. Under TP a forward needs every shard's collectives
        (a Health sent to one shard must not hang it), so only the device is probed."""
        if self.pctx.world_size > 1:
            probe = torch.ones(8, device=self.pctx.device).sum()
            if float(probe) != 8.0:
                raise RuntimeError("health check: the device computed a wrong sum")
            return
        logits = Runner(self.model, None, self.pctx.device).forward_no_cache([1], [0], [1.0])
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("health check: the model returned non-finite logits")

    # ------------------------------------------------------------------ one step
    def _release(self, requests: list[RequestState]) -> None:
        assert self.allocator is not None
        for r in requests:
            if r.owns_blocks and r.blocks:
                self.allocator.release(r.blocks)
                r.blocks = []

    def _drop_finished(self, batch: Batch) -> Batch | None:
        keep = [r.id for r in batch.requests if not r.finished]
        if len(keep) == len(batch.requests):
            return batch
        if not keep:
            self._release(batch.requests)
            return None
        new, dropped = batch.filter(keep)
        self._release(dropped)
        return new

    def _look_ahead(self, batch: Batch) -> None:
        """A look-ahead cannot know how many drafts the step accepts, nor compute the heads' logits: none for a
        batch that speculates."""
        assert self.runner is not None
        if self.model.medusa_heads or any(r.drafts for r in batch.requests):
            lookahead.clear(batch.requests)
            return
        lookahead.start(self.runner, batch, self.adapters, wanted=self.cfg.look_ahead, world_size=self.pctx.world_size)

    def _feeds(self, batch: Batch) -> bool:
        """The fed look-ahead (EngineConfig.look_ahead_fed) launches before the step's tokens are appended, so
        only where no drafts can follow them: no Medusa heads, no prompt lookup for a batch that verifies."""
        drafts = self.cfg.speculative_tokens > 0 and len(batch.requests) <= chunks.MAX_VERIFY_ROWS
        return self.cfg.look_ahead_fed and not self.model.medusa_heads and not drafts

    def _fed_look_ahead(self, batch: Batch) -> lookahead.Feed | None:
        assert self.runner is not None
        return lookahead.prepare_fed(
            self.runner, batch, self.adapters, wanted=self.cfg.look_ahead, world_size=self.pctx.world_size
        )
