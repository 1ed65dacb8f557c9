"""Batch → model inputs (the seed's forward arguments) → logits; the runner owns the KV cache and the
decode CUDA graphs (sized and built from what the engine asks for).

Each request computes a span of its tokens (engine/chunks.py): a prompt chunk, or its last token. Logits come
back only for the tokens that need them (the last of each request, and every computed prompt token of requests
that asked for prefill logprobs).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.distributed import ParallelContext
from worker.engine.batch import Adapters, Batch
from worker.engine.chunks import RowSpan, default_span
from worker.engine.config import EngineConfig
from worker.engine.cuda_graphs import GraphedDecode
from worker.engine.graphed_spans import GraphedSpans, capture_spans
from worker.engine.graphed_verify import GraphedVerify, capture_verify
from worker.engine.kv_cache import KVCache
from worker.layers.context import ForwardContext, Seqlen
from worker.layers.lora import AdapterBatchData
from worker.models.qwen import FlashQwenForCausalLM

log = logging.getLogger(__name__)


@dataclass
class StepLogits:
    last: torch.Tensor  # [B, V]: logits for each request's next token
    # request position in batch -> [n_computed, V]: every computed token's logits (prefill logprobs; a verify
    # row's [last, drafts...])
    prompt: dict[int, torch.Tensor]
    # with Medusa heads (forward(..., speculative=True)): per request [n_rows, K, V] at the rows it got logits for
    # (the last, or those of `prompt`), None for a request whose adapter and the base carry no heads
    speculative: list[torch.Tensor | None] | None = None


def set_kv_scales(
    model: FlashQwenForCausalLM, kv: KVCache, calibrated: tuple[torch.Tensor, torch.Tensor] | None, margin: float
) -> None:
    """fp8 cache: per-layer scales from the checkpoint, else from Warmup's calibration, else 1.0."""
    if not kv.is_fp8:
        model.set_kv_scales(None, None)
        return
    from_ckpt = model.checkpoint_kv_scales()
    scales: tuple[Sequence[float] | torch.Tensor, Sequence[float] | torch.Tensor]
    if from_ckpt is not None:
        source, scales = "checkpoint", from_ckpt
    elif calibrated is not None:
        source, scales = f"Warmup calibration (margin {margin:g})", calibrated
    else:
        source, scales = "default 1.0 (no checkpoint scales, no Warmup yet)", ([1.0] * kv.num_layers,) * 2
        log.warning("fp8 KV cache without k_scale/v_scale in the checkpoint and before Warmup: scales are 1.0")
    kv.set_scales(*scales)
    assert kv.k_scales is not None and kv.v_scales is not None
    model.set_kv_scales(kv.k_scales, kv.v_scales)
    k, v = kv.k_scales.tolist(), kv.v_scales.tolist()
    log.info(
        "fp8 KV scales from %s: k %.3g..%.3g (layer 0 %.3g), v %.3g..%.3g (layer 0 %.3g)",
        source,
        min(k),
        max(k),
        k[0],
        min(v),
        max(v),
        v[0],
    )


def capture_decode(
    model: FlashQwenForCausalLM, kv: KVCache, pctx: ParallelContext, cfg: EngineConfig, adapters: Adapters | None
) -> GraphedDecode:
    """Decode graphs per batch-size bucket (and a LoRA variant of each when adapters are enabled); padding
    rows write into the last block, which no request owns."""
    if adapters is not None:  # no pinned allocation in another thread while capturing
        adapters.wait_pinned()
    t0 = time.time()
    free0 = torch.cuda.mem_get_info(pctx.device)[0]
    graphs = GraphedDecode(
        model,
        kv,
        cfg.max_batch_size or cfg.graph_max_batch,
        math.ceil(cfg.max_seq_len / cfg.block_size),
        kv.num_blocks - 1,
        adapter_pools=adapters is not None,
    )
    log.info(
        "CUDA graphs: %d decode buckets captured in %.1fs, %.0f MiB%s",
        len(graphs.graphs),
        time.time() - t0,
        (free0 - torch.cuda.mem_get_info(pctx.device)[0]) / 2**20,
        (
            " (twice: "
            + ", ".join(f"{bs} row{'s' * (bs > 1)} below {t} tokens" for bs, t in graphs.long_tokens.items())
            + " on the CUDA decode attention, the Triton split kernels from there)"
            if graphs.long_tokens
            else ""
        ),
    )
    return graphs


class Runner:
    def __init__(
        self,
        model: FlashQwenForCausalLM,
        kv: KVCache | None,
        device: torch.device,
        graphs: GraphedDecode | None = None,
        span_graphs: GraphedSpans | None = None,
        verify_graphs: GraphedVerify | None = None,
    ):
        self.model = model
        self.kv = kv
        self.device = device
        self.graphs = graphs  # CUDA graphs for decode (None: eager)
        self.span_graphs = span_graphs  # CUDA graphs for small span steps after a cached prefix (None: eager)
        self.verify_graphs = verify_graphs  # ... with every token's logits (verify steps; None: eager)

    @classmethod
    def with_cache(
        cls,
        model: FlashQwenForCausalLM,
        pctx: ParallelContext,
        cfg: EngineConfig,
        num_blocks: int,
        calibrated: tuple[torch.Tensor, torch.Tensor] | None = None,
        adapters: Adapters | None = None,
    ) -> Runner:
        """A runner owning a new KV cache of num_blocks (at least 3: the last is the graphs' scratch block)
        with its fp8 scales set, and decode CUDA graphs where they apply (GPU, triton backend)."""
        c = model.config
        kv = KVCache(
            c.num_hidden_layers,
            max(num_blocks, 3),
            cfg.block_size,
            c.num_attention_heads // pctx.world_size,
            c.head_dim,
            cfg.kv_cache_dtype or model.dtype,
            pctx.device,
        )
        set_kv_scales(model, kv, calibrated, cfg.kv_scale_margin)  # before capture: graphs read them by pointer
        graphs = spans = verify = None
        if cfg.cuda_graphs and pctx.device.type == "cuda" and model.backend.name == "triton":
            graphs = capture_decode(model, kv, pctx, cfg, adapters)
            spans = capture_spans(model, kv, pctx, cfg)
            verify = capture_verify(model, kv, pctx, cfg, spans.pool)
        return cls(model, kv, pctx.device, graphs, spans, verify)

    def release_graphs(self) -> None:
        """Drop every CUDA graph (decode, span, verify). Under TP they hold NCCL collectives, and destroying the
        process group while such graphs live hangs in destroy_process_group (seen on two H200s): the shard
        releases them before it leaves the group (Engine.close)."""
        self.graphs = self.span_graphs = self.verify_graphs = None

    def _block_table(self, batch: Batch) -> torch.Tensor:
        width = max(len(r.blocks) for r in batch.requests)
        rows = [r.blocks + [0] * (width - len(r.blocks)) for r in batch.requests]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    @torch.inference_mode()
    def forward(
        self,
        batch: Batch,
        prefill: bool,
        adapter_slots: list[int] | None = None,
        spans: Sequence[RowSpan] | None = None,
        speculative: bool = False,
    ) -> StepLogits:
        """adapter_slots: the adapter pool slot of each request (0: base), or None when none uses one. spans: the
        tokens each request computes (engine/chunks.py); None: a prefill computes ids[n_cached:] (every prompt
        logit for requests with prefill_logprobs), a decode each last token. `prefill` picks the path: the
        prefill path serves any mix of chunks, decode rows (a one-token chunk after len - 1 cached tokens) and
        verify rows (the last token and its drafts, at the request's own next slots); a decode without spans
        may replay a CUDA graph. speculative: also the Medusa heads' logits (StepLogits.speculative)."""
        if (
            not prefill
            and not speculative
            and spans is None
            and self.graphs is not None
            and self.graphs.can_run(batch)
            and (adapter_slots is None or self.graphs.has_lora)
        ):
            return StepLogits(last=self.graphs.run(batch, adapter_slots), prompt={})
        if prefill and not speculative and self.span_graphs is not None:
            graphed = self.span_graphs.try_run(batch, spans, adapter_slots)
            if graphed is not None:
                return StepLogits(last=graphed, prompt={})
        if prefill and spans is not None and self.verify_graphs is not None:
            v = self.verify_graphs.try_verify(batch, spans, adapter_slots, speculative)
            if v is not None:
                return StepLogits(v.last, v.prompt, v.speculative)
        if spans is None:
            spans = [default_span(r, prefill) for r in batch.requests]
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        n_new: list[int] = []
        cache_lens: list[int] = []
        head: list[int] = []
        prompt_rows: dict[int, tuple[int, int]] = {}
        for i, (r, sp) in enumerate(zip(batch.requests, spans)):
            start, n = sp.start, sp.n_tokens  # a verify row's drafts sit at positions stop, stop + 1, ...
            offset = len(ids)
            ids += r.ids[start : sp.stop] + list(sp.drafts)
            pos += range(start, start + n)
            slots += r.slots[start : start + n]
            n_new.append(n)
            cache_lens.append(start)
            if sp.prompt_logits:
                prompt_rows[i] = (len(head), n)
                head += range(offset, offset + n)
            else:
                head.append(offset + n - 1)
        assert self.kv is not None  # only forward_no_cache runs without a cache
        dev = self.device
        seqlen = Seqlen.for_prefill(n_new, cache_lens, [r.ntk_alpha for r in batch.requests], device=dev)
        lm_head_indices = torch.tensor(head, dtype=torch.long, device=dev)
        adapter_data = None if adapter_slots is None else AdapterBatchData.build(adapter_slots, n_new, dev)
        ctx = ForwardContext.build(
            self.model.rotary,
            is_prefill=prefill,
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            seqlen=seqlen,
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=self._block_table(batch),
            lm_head_indices=lm_head_indices,
            adapter_data=adapter_data,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        spec = None
        if speculative:
            counts = [prompt_rows[i][1] if i in prompt_rows else 1 for i in range(len(spans))]
            row_slots = None if adapter_slots is None else [a for a, c in zip(adapter_slots, counts) for _ in range(c)]
            logits, spec = self.model.forward_speculative(input_ids, ctx, self.kv.layers, row_slots)
        else:
            logits = self.model.forward_context(input_ids, ctx, self.kv.layers)
        for r, sp in zip(batch.requests, spans):
            r.n_cached = sp.stop
        last_rows, prompt = [], {}
        starts = []
        cursor = 0
        for i in range(len(batch.requests)):
            starts.append(cursor)
            if i in prompt_rows:
                s, n = prompt_rows[i]
                prompt[i] = logits[s : s + n]
                last_rows.append(s + n - 1)
                cursor = s + n
            else:
                last_rows.append(cursor)
                cursor += 1
        last = logits[torch.tensor(last_rows, device=logits.device)]
        return StepLogits(last=last, prompt=prompt, speculative=self._per_request(spec, starts, cursor, adapter_slots))

    def _per_request(
        self, spec: torch.Tensor | None, starts: list[int], end: int, adapter_slots: list[int] | None
    ) -> list[torch.Tensor | None] | None:
        """Medusa logits [N, K, V] cut per request (rows starts[i]..starts[i+1]); None for requests without heads."""
        if spec is None:
            return None
        has = self.model.medusa_rows(adapter_slots if adapter_slots is not None else [0] * len(starts))
        bounds = [*starts, end]
        return [spec[bounds[i] : bounds[i + 1]] if has[i] else None for i in range(len(starts))]

    @torch.inference_mode()
    def forward_no_cache(
        self, lengths: list[int], ids: list[int], alphas: list[float], scratch: KVCache | None = None
    ) -> torch.Tensor:
        """A prefill of whole prompts outside the serving cache (Warmup's memory probe, Health): last-token
        logits [B, V]. K/V are stored only into `scratch` when given: an unscaled cache with block size 1 and
        a block per token (Warmup's fp8 calibration reads it), token t of the step in slot t."""
        dev = self.device
        seqlen = Seqlen.for_prefill(lengths, None, alphas, device=dev)
        pos = [p for n in lengths for p in range(n)]
        last = torch.cumsum(torch.tensor(lengths, device=dev), 0) - 1
        slots = tables = None
        if scratch is not None:
            slots = torch.arange(len(ids), device=dev)
            width, start, rows = max(lengths), 0, []
            for n in lengths:
                rows.append(list(range(start, start + n)) + [0] * (width - n))
                start += n
            tables = torch.tensor(rows, dtype=torch.int32, device=dev)  # [B, max length]
        ctx = ForwardContext.build(
            self.model.rotary,
            is_prefill=True,
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
            seqlen=seqlen,
            slots=slots,
            block_tables=tables,
            lm_head_indices=last,
        )
        return self.model.forward_context(
            torch.tensor(ids, dtype=torch.long, device=dev), ctx, None if scratch is None else scratch.layers
        )
