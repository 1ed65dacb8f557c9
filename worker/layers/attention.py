"""Attention over the paged KV cache, behind one interface with backends chosen once at start-up.

`torch` (portable, CPU and GPU; the reference the others are tested against) handles, for a batch
mixing sequences of different lengths and non-contiguous, out-of-order blocks: (a) plain prefill,
(b) prefill of a suffix after `cache_len` cached tokens, (c) decode. Queries of a sequence's new tokens
attend causally to all of its cached tokens plus themselves.
`triton` (attention_triton.py; GPU, and on CPU tensors through the Triton interpreter in tests) unpacks the
context into the plain-tensor kernels of worker/kernels.

fp8 caches: `store` and `attend` take the layer's `k_scale`/`v_scale` (python floats or 0-d fp32 tensors;
None, the default, means an unscaled cache): stored clamp(x / scale, ±448), read back as fp32 × scale.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F

from worker.layers.context import ForwardContext
from worker.ops import Scale, dequantize, gather_context, store_kv

log = logging.getLogger(__name__)


class AttentionBackend(Protocol):
    name: str

    def store(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        k_scale: Scale = None,
        v_scale: Scale = None,
    ) -> None: ...

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        ctx: ForwardContext,
        scale: float,
        k_scale: Scale = None,
        v_scale: Scale = None,
    ) -> torch.Tensor: ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [n, h, d] at the last n positions of k/v: [L, h, d]; fp32 math, result in q's dtype."""
    n, L = q.shape[0], k.shape[0]
    offset = L - n
    key_pos = torch.arange(L, device=q.device)
    query_pos = torch.arange(n, device=q.device) + offset
    mask = key_pos[None, :] <= query_pos[:, None]  # [n, L]
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1).to(q.dtype)


class TorchAttention:
    """Per-sequence gather + SDPA in fp32. Exact; not the fast path."""

    name = "torch"

    def store(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        k_scale: Scale = None,
        v_scale: Scale = None,
    ) -> None:
        store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        ctx: ForwardContext,
        scale: float,
        k_scale: Scale = None,
        v_scale: Scale = None,
    ) -> torch.Tensor:
        # q, k, v: [T, heads, head_dim] of the new tokens -> [T, heads, head_dim]
        scaled = k_scale is not None or v_scale is not None
        cu = ctx.seqlen.cu_seqlen_q.tolist()
        lengths = ctx.seqlen.input_lengths.tolist()
        out = torch.empty_like(q)
        tables = ctx.block_tables
        for i in range(len(cu) - 1):
            s, e = cu[i], cu[i + 1]
            if k_cache is None:  # no cache: the new tokens are the whole context
                keys, values = k[s:e], v[s:e]
            else:
                assert v_cache is not None and tables is not None
                keys = gather_context(k_cache, tables[i], lengths[i])
                values = gather_context(v_cache, tables[i], lengths[i])
                if scaled:  # fp32, dequantised exactly (causal_attention computes in fp32)
                    keys, values = dequantize(keys, k_scale), dequantize(values, v_scale)
                else:
                    keys, values = keys.to(q.dtype), values.to(q.dtype)
            out[s:e] = causal_attention(q[s:e], keys, values, scale)
        return out


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` picks `triton` on CUDA when triton imports, else `torch`."""
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown attention backend {name!r} (choose auto, torch or triton)")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention()
    try:
        from worker.layers.attention_triton import TritonAttention
    except ImportError:
        if name == "triton":
            raise
        return TorchAttention()
    return TritonAttention()
