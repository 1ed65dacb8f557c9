"""The shard's state machine: live batches, the KV cache, and one generation step.

Every shard runs every batch (same sampling, same stop checks) so their states never drift; a
shard reports generations only for its own requests (`request.id % world_size == rank`). Calls are
serialised by the server; nothing here is thread-safe on its own.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from worker.distributed import ParallelContext
from worker.engine.batch import Batch, BatchBuilder, RequestState
from worker.engine.kv_cache import BlockAllocator, KVCache, scales_from_amax
from worker.engine.runner import Runner, StepLogits
from worker.engine.sampling import prefill_logprobs
from worker.errors import InvalidArgument, NotFound, ResourceExhausted
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb
from worker.tokenizer import QwenTokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_dtype: Optional[torch.dtype] = None  # None: the model dtype
    max_total_tokens: int = 0  # KV token slots per shard; 0: size from memory (GPU) or cpu_default_tokens
    memory_fraction: float = 0.9  # share of free GPU memory the KV cache may take after Warmup
    cpu_default_tokens: int = 16384
    shard_block_fraction: float = 1 / 64  # blocks kept for requests that come without blocks
    max_batch_size: int = 0
    cuda_graphs: bool = True  # decode from CUDA graphs (GPU with the triton backend); --eager turns them off
    graph_max_batch: int = 128
    max_seq_len: int = 16384  # longest context a graphed decode serves (block-table width); longer: eager
    # fp8 KV without checkpoint scales: scale = margin × (Warmup's max |k| or |v|) / 448 per layer. e4m3 is a
    # float format, so a margin of 2 costs one binade at the bottom of its range (values under
    # scale × 2^-6 lose relative precision), while values above the calibrated maximum clamp; real
    # prompts can exceed Warmup's. vLLM's defaults are amax/200 (K) and amax/100 (V): margins 2.24 and 4.48.
    kv_scale_margin: float = 2.0
    # start each batch's next decode forward before replying (overlaps the reply, the router and the next
    # request with the GPU). None: when CUDA graphs serve the batch, at TP=1 only (under TP a look-ahead that
    # fails on one rank alone, e.g. out of memory, would leave the ranks' collectives out of step);
    # True: always (tests; under TP at that risk); False: never
    look_ahead: Optional[bool] = None


class Engine:
    def __init__(self, model: FlashQwenForCausalLM, tokenizer: QwenTokenizer, pctx: ParallelContext,
                 cfg: EngineConfig, adapters: object = None):
        self.model = model
        self.tokenizer = tokenizer
        self.pctx = pctx
        self.cfg = cfg
        self.adapters = adapters
        self.batches: dict[int, Batch] = {}
        self.kv: Optional[KVCache] = None
        self.runner: Optional[Runner] = None
        self.allocator: Optional[BlockAllocator] = None
        self.router_blocks = 0
        self.max_supported_total_tokens = 0
        self.calibrated_kv_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # from Warmup (fp8 KV)
        nonce = torch.randint(1, 2**62, (1,), device=pctx.device)
        self.seed_nonce = int(pctx.broadcast(nonce).item())  # rank 0's, on every rank

    # ------------------------------------------------------------------ KV cache
    @property
    def kv_dtype(self) -> torch.dtype:
        return self.cfg.kv_cache_dtype or self.model.dtype

    def allocate_cache(self, num_blocks: int) -> None:
        c = self.model.config
        dtype = self.kv_dtype
        num_blocks = max(num_blocks, 3)
        self.kv = None
        self.kv = KVCache(c.num_hidden_layers, num_blocks, self.cfg.block_size,
                          c.num_attention_heads // self.pctx.world_size, c.head_dim, dtype, self.pctx.device)
        self._set_kv_scales()  # before the graphs are captured (they read the scales through pointers)
        own = max(2, int(num_blocks * self.cfg.shard_block_fraction))  # incl. the scratch block
        self.router_blocks = num_blocks - own
        scratch = num_blocks - 1  # padding rows of graphed decode write here; nobody owns it
        self.allocator = BlockAllocator(self.router_blocks, own - 1)
        self.max_supported_total_tokens = self.router_blocks * self.cfg.block_size
        graphs = None
        if self.cfg.cuda_graphs and self.pctx.device.type == "cuda" and self.model.backend.name == "triton":
            import time

            from worker.engine.cuda_graphs import GraphedDecode

            if self.adapters is not None:  # no pinned allocation in another thread while capturing
                self.adapters.wait_pinned()
            t0 = time.time()
            free0 = torch.cuda.mem_get_info(self.pctx.device)[0]
            graphs = GraphedDecode(self.model, self.kv, self.cfg.max_batch_size or self.cfg.graph_max_batch,
                                   math.ceil(self.cfg.max_seq_len / self.cfg.block_size), scratch,
                                   adapter_pools=self.adapters is not None)  # + a variant with LoRA per bucket
            log.info("CUDA graphs: %d decode buckets captured in %.1fs, %.0f MiB", len(graphs.graphs),
                     time.time() - t0, (free0 - torch.cuda.mem_get_info(self.pctx.device)[0]) / 2**20)
        self.runner = Runner(self.model, self.kv, self.pctx.device, graphs)
        auto = ("off (no CUDA graphs)" if graphs is None else "off (TP: set --look-ahead on to use it)"
                if self.pctx.world_size > 1 else "on where CUDA graphs serve the batch")
        log.info("decode look-ahead: %s", {None: auto, True: "on", False: "off"}[self.cfg.look_ahead])
        log.info("KV cache: %d blocks x %d tokens (%s), %d for the router (%d tokens), %d kept by the shard",
                 num_blocks, self.cfg.block_size, dtype, self.router_blocks, self.max_supported_total_tokens, own)

    def _set_kv_scales(self) -> None:
        """fp8 cache: per-layer scales from the checkpoint, else from Warmup's calibration, else 1.0."""
        assert self.kv is not None
        if not self.kv.is_fp8:
            self.model.set_kv_scales(None, None)
            return
        from_ckpt = self.model.checkpoint_kv_scales()
        if from_ckpt is not None:
            source, scales = "checkpoint", from_ckpt
        elif self.calibrated_kv_scales is not None:
            source, scales = f"Warmup calibration (margin {self.cfg.kv_scale_margin:g})", self.calibrated_kv_scales
        else:
            source, scales = "default 1.0 (no checkpoint scales, no Warmup yet)", ([1.0] * self.kv.num_layers,) * 2
            log.warning("fp8 KV cache without k_scale/v_scale in the checkpoint and before Warmup: scales are 1.0")
        self.kv.set_scales(*scales)
        self.model.set_kv_scales(self.kv.k_scales, self.kv.v_scales)
        k, v = self.kv.k_scales.tolist(), self.kv.v_scales.tolist()
        log.info("fp8 KV scales from %s: k %.3g..%.3g (layer 0 %.3g), v %.3g..%.3g (layer 0 %.3g)", source,
                 min(k), max(k), k[0], min(v), max(v), v[0])

    def _ensure_cache(self) -> None:
        if self.kv is None:
            tokens = self.cfg.max_total_tokens or self.cfg.cpu_default_tokens
            self.allocate_cache(math.ceil(tokens / self.cfg.block_size))

    def _blocks_from_memory(self, activation_peak: int) -> int:
        c = self.model.config
        per_token = KVCache.bytes_per_token(c.num_hidden_layers, c.num_attention_heads // self.pctx.world_size,
                                            c.head_dim, self.kv_dtype)
        if self.cfg.max_total_tokens:
            return math.ceil(self.cfg.max_total_tokens / self.cfg.block_size)
        if self.pctx.device.type != "cuda":
            return math.ceil(self.cfg.cpu_default_tokens / self.cfg.block_size)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.pctx.device)
        budget = int((free - activation_peak) * self.cfg.memory_fraction)
        blocks = budget // (per_token * self.cfg.block_size)
        if blocks < 2:
            raise ResourceExhausted(f"not enough GPU memory for a KV cache: {free / 2**30:.2f} GiB free, "
                                    f"{activation_peak / 2**30:.2f} GiB needed by the warmup batch's activations")
        return blocks

    # ------------------------------------------------------------------ RPC bodies
    def builder(self) -> BatchBuilder:
        self._ensure_cache()
        assert self.allocator is not None
        live = {rid for b in self.batches.values() for rid in b.request_ids}
        return BatchBuilder(self.tokenizer, self.model.config.vocab_size, self.model.config.seq_length,
                            self.model.config.use_dynamic_ntk, self.cfg.block_size, self.router_blocks,
                            self.allocator, self.pctx.rank, self.pctx.world_size, str(self.pctx.device),
                            self.adapters, self.cfg.max_batch_size, False, live, self.seed_nonce)

    def warmup(self, request: "pb.WarmupRequest") -> int:
        """Run the router's largest prefill without a cache to find the activation peak, then size the
        KV cache from what is left. Returns max_supported_total_tokens."""
        self.clear(None)
        self.kv = self.runner = self.allocator = None
        builder = BatchBuilder(self.tokenizer, self.model.config.vocab_size, self.model.config.seq_length,
                               self.model.config.use_dynamic_ntk, self.cfg.block_size, 0,
                               BlockAllocator(0, 1), world_size=self.pctx.world_size, rank=self.pctx.rank)
        lengths, ids, alphas = [], [], []
        for req in request.batch.requests:
            p = builder.prompt_ids(req)
            if request.max_input_length:
                p = p[-request.max_input_length:]
            lengths.append(len(p))
            ids += p
            alphas.append(1.0)
        peak = 0
        calibrate = self.kv_dtype == torch.float8_e4m3fn and self.model.checkpoint_kv_scales() is None
        amax = torch.zeros(self.model.config.num_hidden_layers, 2, device=self.pctx.device) if calibrate else None
        if ids:
            if self.pctx.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(self.pctx.device)
                base = torch.cuda.memory_allocated(self.pctx.device)
            try:
                Runner(self.model, None, self.pctx.device).forward_no_cache(lengths, ids, alphas, amax)  # type: ignore
            except torch.OutOfMemoryError as exc:
                raise ResourceExhausted(f"not enough memory for {len(ids)} prefill tokens in Warmup: {exc}") from exc
            if self.pctx.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.pctx.device) - base
            if amax is not None:  # same scales on every rank (each saw its own heads)
                scales = scales_from_amax(self.pctx.all_reduce_max(amax), self.cfg.kv_scale_margin)
                self.calibrated_kv_scales = (scales[:, 0], scales[:, 1])
        self.allocate_cache(self._blocks_from_memory(peak))
        return self.max_supported_total_tokens

    def prefill(self, pb_batch: "pb.Batch", cached: Optional["pb.CachedBatch"]) -> tuple[list, Optional[Batch]]:
        if pb_batch.id in self.batches:
            raise InvalidArgument(f"batch id {pb_batch.id} is already live on this shard")
        if cached is not None and cached.id not in self.batches:
            raise NotFound(f"cached batch {cached.id} is not on this shard")
        batch = self.builder().build(pb_batch)  # validates everything before any state changes
        generations, batch = self._run(batch, prefill=True)
        if cached is not None:
            old = self.batches.pop(cached.id)
            batch = Batch.concatenate([old] + ([batch] if batch else [])) if batch else old
        if batch is not None:
            self.batches[batch.id] = batch
        return generations, batch

    def decode(self, cached: list["pb.CachedBatch"]) -> tuple[list, Optional[Batch]]:
        if not cached:
            raise InvalidArgument("Decode needs at least one cached batch")
        missing = [c.id for c in cached if c.id not in self.batches]
        if missing:
            raise NotFound(f"batch ids {missing} are not on this shard")
        if len({c.id for c in cached}) != len(cached):
            raise InvalidArgument(f"Decode lists a batch twice: {[c.id for c in cached]}")
        batches = [self.batches.pop(c.id) for c in cached]
        batch = Batch.concatenate(batches) if len(batches) > 1 else batches[0]
        generations, batch = self._run(batch, prefill=False)
        if batch is not None:
            self.batches[batch.id] = batch
        return generations, batch

    def _run(self, batch: Batch, prefill: bool) -> tuple[list, Optional[Batch]]:
        """One forward + sampling step; on failure the batch's KV blocks are released and the error raised.
        Returns the generations and the batch without its finished requests (None if none are left), whose
        next forward is then started (look-ahead)."""
        try:
            generations = self._step(batch, prefill=prefill)
        except Exception:
            self._release(batch.requests)
            raise
        survivors = self._drop_finished(batch)
        if survivors is not None:
            self._look_ahead(survivors)
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

    def clear(self, batch_id: Optional[int]) -> None:
        ids = list(self.batches) if batch_id is None else [batch_id]
        for bid in ids:
            batch = self.batches.pop(bid, None)
            if batch is not None:
                self._release(batch.requests)

    def stats(self) -> dict[str, int]:
        return {"batches": len(self.batches),
                "requests": sum(len(b.requests) for b in self.batches.values()),
                "shard_blocks_free": self.allocator.free if self.allocator else 0,
                "shard_blocks_total": self.allocator.count if self.allocator else 0,
                "router_blocks": self.router_blocks}

    def health(self) -> None:
        logits = Runner(self.model, None, self.pctx.device).forward_no_cache([1], [0], [1.0])  # type: ignore
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("health check: the model returned non-finite logits")

    # ------------------------------------------------------------------ one step
    def _release(self, requests: list[RequestState]) -> None:
        assert self.allocator is not None
        for r in requests:
            if r.owns_blocks and r.blocks:
                self.allocator.release(r.blocks)
                r.blocks = []

    def _drop_finished(self, batch: Batch) -> Optional[Batch]:
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
        """Start the batch's next decode forward now, so the reply, the router's turn and the next Decode
        travel while the device works. Only the forward: sampling waits for the Decode that uses these
        logits (seeded streams stay as they were), and a request's row serves only while its tokens are
        unchanged. Rows a later filter or concatenate leaves out are dropped with their requests, and
        requests without one are computed then. The K/V this writes are the ones that step would write. Every
        rank takes the same decisions (same calls, same state), so the collectives stay in step."""
        assert self.runner is not None
        reqs = batch.requests
        for r in reqs:
            r.ahead = None
        wanted = self.cfg.look_ahead
        graphs = self.runner.graphs
        if wanted is False or (wanted is None and (graphs is None or not graphs.can_run(batch)
                                                   or self.pctx.world_size > 1)):
            return
        if any(len(r.slots) < len(r.ids) for r in reqs):  # the next position's KV slot is not allocated yet
            return
        try:  # an optimisation: a failure must not fail the step that already happened
            slots = self.adapters.request_slots(batch) if self.adapters is not None else None
            logits = self.runner.forward(batch, False, slots).last.clone()  # a graph's output buffer is reused
        except Exception as exc:
            log.warning("decode look-ahead of batch %d failed (%r): its next Decode runs the forward itself%s",
                        batch.id, exc, "; under TP the ranks' collectives may now be out of step"
                        if self.pctx.world_size > 1 else "")
            return
        for i, r in enumerate(reqs):
            r.ahead = (logits, i, len(r.ids))

    def _logits(self, batch: Batch, prefill: bool, adapter_slots: Optional[list[int]]) -> StepLogits:
        """This step's logits. A decode takes each request's look-ahead row when it was computed for the
        request's current tokens and runs the forward for the other requests only."""
        assert self.runner is not None
        reqs = batch.requests
        ready = [not prefill and r.ahead is not None and r.ahead[2] == len(r.ids) for r in reqs]
        if not any(ready):
            for r in reqs:
                r.ahead = None
            return self.runner.forward(batch, prefill, adapter_slots)
        rows: list[Optional[torch.Tensor]] = [None] * len(reqs)
        missing = [i for i, ok in enumerate(ready) if not ok]
        if missing:
            sub = Batch(batch.id, [reqs[i] for i in missing], batch.sampler)
            computed = self.runner.forward(sub, False, None if adapter_slots is None else
                                           [adapter_slots[i] for i in missing]).last
            for j, i in enumerate(missing):
                rows[i] = computed[j]
        first = reqs[0].ahead
        whole = (not missing and first[0].shape[0] == len(reqs)  # all of one look-ahead, in its order
                 and all(r.ahead[0] is first[0] and r.ahead[1] == i for i, r in enumerate(reqs)))
        for i, (r, ok) in enumerate(zip(reqs, ready)):
            if ok:
                rows[i] = r.ahead[0][r.ahead[1]]
            r.ahead = None
        return StepLogits(last=first[0] if whole else torch.stack(rows), prompt={})

    def _step(self, batch: Batch, prefill: bool) -> list:
        assert self.runner is not None
        adapter_slots = self.adapters.request_slots(batch) if self.adapters is not None else None
        step = self._logits(batch, prefill, adapter_slots)
        out = batch.sampler(step.last, [r.ids for r in batch.requests])
        next_ids = self.pctx.broadcast(out.next_ids.clone())  # identical tokens on every rank
        next_list = next_ids.tolist()
        logprobs = out.logprobs.tolist()
        generations = []
        for i, r in enumerate(batch.requests):
            tid = next_list[i]
            prompt_pb = None
            if prefill and r.prefill_logprobs and r.report:
                prompt_pb = self._prefill_tokens(r, step.prompt[i])
            r.ids.append(tid)
            text = r.detok.add(tid)
            reason = r.stopping.check(tid, r.detok.text, r.n_generated)
            if reason is not None:
                r.finished = True
            if not r.report:
                continue
            alts = []
            if r.params.return_k_alternatives:
                alts = [pb.AlternativeTokens(ids=out.top_ids[i], logprobs=out.top_logprobs[i],
                                             texts=[self.tokenizer.token_text(t) for t in out.top_ids[i]])]
            gen = pb.Generation(
                request_id=r.id,
                next_tokens=pb.NextTokens(ids=[tid], logprobs=[logprobs[i]], texts=[text],
                                          is_special=[self.tokenizer.is_special(tid)], alternative_tokens=alts),
                prefill_tokens_length=(len(r.ids) - 1 - r.prefill_cache_len) if prefill else 0)
            if prompt_pb is not None:
                gen.prefill_tokens.CopyFrom(prompt_pb)
            if reason is not None:
                generated = r.ids[r.prompt_len:]
                gen.generated_text.CopyFrom(pb.GeneratedText(
                    text=self.tokenizer.decode(generated, skip_special_tokens=True),
                    generated_tokens=len(generated), finish_reason=int(reason),
                    **({"seed": batch.sampler.seeds[i]} if not r.params.is_greedy else {})))
            generations.append(gen)
        return generations

    def _prefill_tokens(self, r: RequestState, logits: torch.Tensor) -> "pb.NextTokens":
        ids = r.ids[r.prefill_cache_len:r.prompt_len]
        lp = prefill_logprobs(logits, torch.tensor(ids, device=logits.device), self.tokenizer.n_real_vocab)
        return pb.NextTokens(ids=ids, logprobs=lp.tolist(), texts=[self.tokenizer.token_text(t) for t in ids],
                             is_special=[self.tokenizer.is_special(t) for t in ids])
