"""The engine's settings (one shard): KV cache size and dtype, batch limits, CUDA graphs, look-ahead, chunked
prefill, speculative decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_dtype: torch.dtype | None = None  # None: the model dtype
    max_total_tokens: int = 0  # KV token slots per shard; 0: from free memory (GPU) or cpu_default_tokens
    memory_fraction: float = 0.9  # share of the free GPU memory after Warmup that the KV cache may take
    cpu_default_tokens: int = 16384
    shard_block_fraction: float = 1 / 64  # blocks kept for requests that come without blocks
    max_batch_size: int = 0  # 0: no limit
    cuda_graphs: bool = True  # graphed decode (GPU, triton backend); --eager turns it off
    graph_max_batch: int = 128
    max_seq_len: int = 16384  # longest context a graphed decode serves (block-table width); longer: eager
    # fp8 KV without checkpoint scales: scale = margin × (Warmup's max |k| or |v|) / 448 per layer. A margin of 2
    # costs one binade at the bottom of e4m3's range; values above the calibrated maximum clamp, and real prompts
    # can exceed Warmup's. vLLM's defaults (amax/200 for K, amax/100 for V) are margins 2.24 and 4.48.
    kv_scale_margin: float = 2.0
    # start each batch's next decode forward before replying (worker/engine/lookahead.py).
    # None: auto (CUDA graphs, TP=1); True: always; False: never
    look_ahead: bool | None = None
    # the look-ahead fed on the device: launched right after the sampler with its ids (no host sync before the
    # forward), instead of after the tokens are appended. On the H200 (7B shape, batch 64, shard in its own
    # process) a Decode's overhead over its forward fell from 10-15 % to 5.3 % (scripts/profile_rpc.py --p7)
    look_ahead_fed: bool = True
    # chunked prefill (LoRAX semantics, worker/engine/chunks.py): Info.chunked_prefill, Request.chunk_len honoured,
    # Prefill(cached_batch) runs one forward for the running and the new requests; --no-chunked-prefill turns it off
    chunked_prefill: bool = True
    # tokens a step may compute for requests still prefilling, until Warmup's max_prefill_tokens replaces it
    max_prefill_tokens: int = 4096
    # prompt-lookup drafts per step (engine/speculative.py; 0: off). With Medusa heads attached, S = K capped by it
    speculative_tokens: int = 0
