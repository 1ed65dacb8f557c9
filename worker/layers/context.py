"""The per-step metadata every layer reads: one `ForwardContext`, built once per forward and passed
explicitly (never a module global).

Token-level tensors cover the T tokens computed in this step (all sequences concatenated); sequence-
level tensors cover the B sequences of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class Seqlen:
    """Sequence lengths of one step (the seed's `seqlen` argument)."""

    input_lengths: torch.Tensor  # [B] int32: tokens of each sequence in the KV cache after this step
    cache_lengths: torch.Tensor  # [B] int32: tokens already cached before this step
    cu_seqlen_q: torch.Tensor  # [B+1] int32: offsets of each sequence's new tokens in the step
    max_q: int  # longest new-token run
    max_k: int  # longest context (input_lengths.max())
    ntk_alpha: Optional[torch.Tensor] = None  # [B] fp32: dynamic-NTK alpha fixed at each prompt's prefill
    max_cache_len: int = -1  # host-side max of cache_lengths (-1: unknown); 0 lets prefill skip the paged path

    @classmethod
    def for_prefill(cls, lengths: list[int], cache_lengths: Optional[list[int]] = None,
                    ntk_alpha: Optional[list[float]] = None, device: torch.device | str = "cpu") -> "Seqlen":
        """Lengths of a (suffix) prefill: `lengths` new tokens after `cache_lengths` cached ones."""
        cache = cache_lengths or [0] * len(lengths)
        total = [c + n for c, n in zip(cache, lengths)]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        i32 = dict(dtype=torch.int32, device=device)
        return cls(torch.tensor(total, **i32), torch.tensor(cache, **i32), torch.tensor(cu, **i32),
                   max(lengths), max(total),
                   None if ntk_alpha is None else torch.tensor(ntk_alpha, dtype=torch.float32, device=device),
                   max(cache))


@dataclass
class ForwardContext:
    is_prefill: bool
    positions: torch.Tensor  # [T] long: absolute position of each new token
    slots: Optional[torch.Tensor]  # [T] long: KV slot of each new token (None: no cache, e.g. training)
    block_tables: Optional[torch.Tensor]  # [B, max_blocks] int32: KV blocks of each sequence, in order
    seqlen: Seqlen
    cos: torch.Tensor  # [T, rotary_dim/2] fp32
    sin: torch.Tensor  # [T, rotary_dim/2] fp32
    logn: Optional[torch.Tensor]  # [T] fp32 query scale, None when logn attention is off
    lm_head_indices: Optional[torch.Tensor]  # [N] long: tokens whose logits are wanted (None: all)
    adapter_data: Any = None  # per-token adapter slots and segments (layers/lora.py)
    kv_amax: Optional[torch.Tensor] = None  # [layers, 2] fp32: running max |k|, |v| (fp8 KV calibration only)
