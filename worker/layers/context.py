"""The per-step metadata every layer reads: one `ForwardContext`, built by the runner once per forward
(`ForwardContext.build`) and passed explicitly (never a module global).

Token-level tensors cover the T tokens computed in this step (all sequences concatenated); sequence-
level tensors cover the B sequences of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker import ops


@dataclass
class Seqlen:
    """Sequence lengths of one step (the seed's `seqlen` argument)."""

    input_lengths: torch.Tensor  # [B] int32: tokens of each sequence in the KV cache after this step
    cache_lengths: torch.Tensor  # [B] int32: tokens already cached before this step
    cu_seqlen_q: torch.Tensor  # [B+1] int32: offsets of each sequence's new tokens in the step
    max_q: int  # longest new-token run
    max_k: int  # longest context (input_lengths.max())
    ntk_alpha: torch.Tensor | None = None  # [B] fp32: dynamic-NTK alpha fixed at each prompt's prefill
    max_cache_len: int = -1  # host-side max of cache_lengths (-1: unknown); 0 lets prefill skip the paged path

    @classmethod
    def for_prefill(
        cls,
        lengths: list[int],
        cache_lengths: list[int] | None = None,
        ntk_alpha: list[float] | None = None,
        device: torch.device | str = "cpu",
    ) -> Seqlen:
        """Lengths of a (suffix) prefill: `lengths` new tokens after `cache_lengths` cached ones."""
        cache = cache_lengths or [0] * len(lengths)
        total = [c + n for c, n in zip(cache, lengths)]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        return cls(
            torch.tensor(total, dtype=torch.int32, device=device),
            torch.tensor(cache, dtype=torch.int32, device=device),
            torch.tensor(cu, dtype=torch.int32, device=device),
            max(lengths),
            max(total),
            None if ntk_alpha is None else torch.tensor(ntk_alpha, dtype=torch.float32, device=device),
            max(cache),
        )


@dataclass(frozen=True)
class RotarySettings:
    """The model's rotary constants the context's cos/sin/logn tables are computed from."""

    rotary_dim: int
    base: float
    seq_length: int  # logn scales queries past this position
    use_logn: bool


@dataclass(slots=True)
class ForwardContext:
    is_prefill: bool
    positions: torch.Tensor  # [T] long: absolute position of each new token
    slots: torch.Tensor | None  # [T] long: KV slot of each new token (None: no cache)
    block_tables: torch.Tensor | None  # [B, max_blocks] int32: KV blocks of each sequence, in order
    seqlen: Seqlen
    cos: torch.Tensor  # [T, rotary_dim/2] fp32
    sin: torch.Tensor  # [T, rotary_dim/2] fp32
    logn: torch.Tensor | None  # [T] fp32 query scale, None when logn attention is off
    lm_head_indices: torch.Tensor | None  # [N] long: tokens whose logits are wanted (None: all)
    adapter_data: Any = None  # per-token adapter slots and segments (layers/lora.py)

    @classmethod
    def build(
        cls,
        rotary: RotarySettings,
        *,
        is_prefill: bool,
        positions: torch.Tensor,
        seqlen: Seqlen,
        slots: torch.Tensor | None = None,
        block_tables: torch.Tensor | None = None,
        lm_head_indices: torch.Tensor | None = None,
        adapter_data: Any = None,
        token_alpha: torch.Tensor | None = None,
    ) -> ForwardContext:
        """The context of one step: each token's rotary tables from its position and its sequence's NTK
        alpha. A decode step makes no host sync here, so a CUDA graph captures it with the forward; a
        prefill does when given `token_alpha` ([T] fp32, each token's alpha, instead of repeating seqlen's)."""
        positions = positions.long()
        alpha: torch.Tensor | None = None  # [T]; None: 1 everywhere
        if token_alpha is not None:
            alpha = token_alpha
        elif seqlen.ntk_alpha is None:
            pass
        elif not is_prefill:  # decode: one token per sequence
            alpha = seqlen.ntk_alpha.to(positions.device)
        else:
            n_new = seqlen.cu_seqlen_q[1:] - seqlen.cu_seqlen_q[:-1]  # [B]
            alpha = seqlen.ntk_alpha.to(positions.device).repeat_interleave(n_new.to(positions.device).long())
        tables = _tables_kernel() if positions.is_cuda else None  # on CUDA one launch instead of PyTorch's 18
        cos, sin, logn = (tables or ops.rotary_tables)(
            positions, alpha, rotary.rotary_dim, rotary.base, rotary.seq_length, rotary.use_logn
        )
        return cls(
            is_prefill=is_prefill,
            positions=positions,
            slots=None if slots is None else slots.long(),
            block_tables=block_tables,
            seqlen=seqlen,
            cos=cos,
            sin=sin,
            logn=logn,
            lm_head_indices=lm_head_indices,
            adapter_data=adapter_data,
        )


def _tables_kernel() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None:
    """worker/kernels/rotary_tables.py's launch where Triton compiles for the GPU (None: PyTorch's ops)."""
    try:
        from worker.kernels import rotary_tables
    except ImportError:  # no Triton (the gpu extra)
        return None
    return None if rotary_tables.INTERPRETED else rotary_tables.rotary_tables
