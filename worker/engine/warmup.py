"""Warmup's side of the KV cache: the router's largest prefill run outside the serving cache (its activation
peak, and fp8 K/V scales calibrated from it), and the number of KV blocks the memory left over holds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worker.distributed import ParallelContext
from worker.engine.config import EngineConfig
from worker.engine.kv_cache import KVCache, scales_from_amax
from worker.engine.runner import Runner
from worker.errors import ResourceExhausted
from worker.models.qwen import FlashQwenForCausalLM


def kv_blocks(
    model: FlashQwenForCausalLM, pctx: ParallelContext, cfg: EngineConfig, activation_peak: int | None
) -> int:
    """KV blocks to allocate: cfg.max_total_tokens when set; on a GPU after Warmup (activation_peak known),
    cfg.memory_fraction of the memory left free beside Warmup's activation peak; else cfg.cpu_default_tokens."""
    if cfg.max_total_tokens or activation_peak is None or pctx.device.type != "cuda":
        return math.ceil((cfg.max_total_tokens or cfg.cpu_default_tokens) / cfg.block_size)
    c = model.config
    per_token = KVCache.bytes_per_token(
        c.num_hidden_layers, c.num_attention_heads // pctx.world_size, c.head_dim, cfg.kv_cache_dtype or model.dtype
    )
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(pctx.device)
    blocks = int((free - activation_peak) * cfg.memory_fraction) // (per_token * cfg.block_size)
    if blocks < 2:
        raise ResourceExhausted(
            f"not enough GPU memory for a KV cache: {free / 2**30:.2f} GiB free, "
            f"{activation_peak / 2**30:.2f} GiB needed by the warmup batch's activations"
        )
    return blocks


@dataclass
class WarmupProbe:
    activation_peak: int  # bytes the prefill's activations took on the GPU (0 elsewhere)
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None  # fp8 (k, v) scales, [num_layers] each; None: not asked


def warmup_prefill(
    model: FlashQwenForCausalLM,
    pctx: ParallelContext,
    lengths: list[int],
    ids: list[int],
    calibrate: bool,
    margin: float,
) -> WarmupProbe:
    """The router's largest prefill outside the serving cache: its activation peak and, with `calibrate`, fp8
    scales from its K/V (stored unscaled in a scratch cache of exactly its tokens; the same on every rank)."""
    if not ids:
        return WarmupProbe(0, None)
    dev = pctx.device
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    scratch = None
    try:
        if calibrate:
            c = model.config
            heads = c.num_attention_heads // pctx.world_size
            scratch = KVCache(c.num_hidden_layers, len(ids), 1, heads, c.head_dim, model.dtype, dev)
            model.set_kv_scales(None, None)
        Runner(model, None, dev).forward_no_cache(lengths, ids, [1.0] * len(lengths), scratch)
    except torch.OutOfMemoryError as exc:
        raise ResourceExhausted(f"not enough memory for {len(ids)} prefill tokens in Warmup: {exc}") from exc
    peak = 0
    if dev.type == "cuda":  # the activations alone: the scratch cache is not kept
        peak = torch.cuda.max_memory_allocated(dev) - base - (scratch.nbytes if scratch else 0)
    if scratch is None:
        return WarmupProbe(peak, None)
    scales = scales_from_amax(pctx.all_reduce_max(scratch.amax()), margin)  # each rank saw its own heads
    return WarmupProbe(peak, (scales[:, 0], scales[:, 1]))
