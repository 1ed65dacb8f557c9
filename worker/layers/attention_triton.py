"""The `triton` attention backend: unpacks the ForwardContext into the plain-tensor Triton kernels of
worker/kernels (store, paged decode, paged prefill). Importing it needs triton.

Prefill without cached tokens goes to torch's FlashAttention `varlen_attn` on CUDA in fp16/bf16 when it
is available, with an fp8 cache too: such prompts attend over their unquantised K/V (as vLLM does);
suffix prefill and decode read the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from worker.kernels.paged_decode import DecodeWorkspace, paged_decode
from worker.kernels.paged_prefill import paged_prefill
from worker.kernels.triton_attention import Tiles, pow2, rows_contiguous, store_kv
from worker.layers.context import ForwardContext
from worker.layers.decode_kernels import DecodeKernels
from worker.ops import Scale

log = logging.getLogger(__name__)

VarlenAttn = Callable[..., Any]


def torch_varlen_attn() -> VarlenAttn | None:
    """FlashAttention-2 inside PyTorch (torch >= 2.10; causal only with window_size=(-1, 0)), if this build has it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    return varlen_attn


# Fresh prompts this long or longer go to the Triton kernel: torch's varlen_attn (FlashAttention-2) is faster for
# 8 x 1024 tokens (0.43 vs 0.63 ms per layer), the Triton kernel for one 32,768-token prompt (18.5 vs 25.0 ms;
# H200, scripts/tune_attention.py).
LONG_PROMPT = 8192


class TritonAttention:
    """Paged attention in Triton. `num_splits` fixes the decode split count (e.g. per captured CUDA-graph
    batch size); None picks it per call from the batch and the longest context (`tiles.decode_splits`)."""

    name = "triton"

    def __init__(self, num_splits: int | None = None, tiles: Tiles | None = None, use_varlen_attn: bool = True):
        self.num_splits = num_splits
        self.tiles = tiles or Tiles()
        self.workspace = DecodeWorkspace()  # the fused decode reduction's counters (kept: graphs read them)
        self.varlen_attn = torch_varlen_attn() if use_varlen_attn else None
        self.pdl = False  # the paged decode kernels launch with PDL (DecodeKernels.pdl; sm_90+, else plainly)
        self.attn_cuda = False  # decode on the CUDA kernel where it serves (DecodeKernels.attn_cuda)

    def set_decode_kernels(self, opts: DecodeKernels) -> None:
        """Every attention layer of a model hands the model's choices to its (shared) backend."""
        self.pdl = opts.pdl
        self.attn_cuda = opts.attn_cuda

    # k, v: [T, heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, heads, head_dim]; slots: [T]
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
        num_splits: int | None = None,
    ) -> torch.Tensor:
        # q, k, v: [T, heads, head_dim] of the new tokens -> [T, heads, head_dim] in q's dtype
        pow2(q.shape[2], "head_dim")
        q = rows_contiguous(q)
        if not ctx.is_prefill:
            if k_cache is None or v_cache is None:
                raise ValueError("decode needs the KV cache")
            return self.decode(q, k_cache, v_cache, ctx, scale, num_splits or self.num_splits, k_scale, v_scale)
        if k_cache is None or ctx.seqlen.max_cache_len == 0:  # fresh prompts: the new tokens are the context
            if self.varlen_attn is not None and ctx.seqlen.max_q >= LONG_PROMPT:
                return self.prefill(q, k, v, None, None, ctx, scale)  # over the exact new k/v, as varlen does
            out = self._varlen(q, k, v, ctx, scale)
            if out is not None:
                return out
        return self.prefill(q, k, v, k_cache, v_cache, ctx, scale, k_scale, v_scale)

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: ForwardContext,
        scale: float,
        num_splits: int | None = None,
        k_scale: Scale = None,
        v_scale: Scale = None,
    ) -> torch.Tensor:
        """One new token per sequence (row b of q is sequence b), already stored in the cache."""
        assert ctx.block_tables is not None
        if self.attn_cuda and self._cuda_serves(q, k_cache, v_cache, ctx, k_scale is not None or v_scale is not None):
            from worker.kernels.paged_decode_cuda import paged_decode_cuda

            lens = ctx.seqlen.input_lengths
            return paged_decode_cuda(q, k_cache, v_cache, ctx.block_tables, lens, scale, self.pdl)
        return paged_decode(
            q,
            k_cache,
            v_cache,
            ctx.block_tables,
            ctx.seqlen.input_lengths,
            ctx.seqlen.max_k,
            scale,
            self.tiles,
            num_splits,
            k_scale,
            v_scale,
            self.workspace,
            self.pdl,
        )

    def decode_rope(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        ctx: ForwardContext,
        scale: float,
    ) -> torch.Tensor | None:
        """Decode with RoPE (+ logn) and the new rows' store inside the CUDA kernel (attn_cuda, unscaled caches), from
        the raw q, k, v of this step; None where it does not serve the step (the caller then rotates, stores and
        attends as before)."""
        if ctx.is_prefill or not self.attn_cuda or ctx.block_tables is None or ctx.slots is None:
            return None
        if not self._cuda_serves(q, k_cache, v_cache, ctx, False):
            return None
        from worker.kernels.paged_decode_cuda import Rope, paged_decode_cuda, rope_serves

        rope = Rope(k, v, ctx.cos, ctx.sin, ctx.logn, ctx.slots)
        if rope_serves(q, rope) is not None:
            return None
        lens = ctx.seqlen.input_lengths
        return paged_decode_cuda(q, k_cache, v_cache, ctx.block_tables, lens, scale, self.pdl, rope)

    def long_decode(self, cache_dtype: torch.dtype, head_dim: int) -> dict[int, int] | None:
        """{rows: tokens}: decode steps of `rows` rows take the CUDA kernel below a longest context of `tokens` and the
        Triton split kernels from there (paged_decode_cuda.LONG_CONTEXT, by the step's max_k), so a graph of those rows
        serves one side only and the engine captures both (engine/cuda_graphs.py); None where the kernel does not
        serve a cache of this dtype and head size (bf16, 128) or attn_cuda is off: one graph a bucket."""
        from worker.kernels.paged_decode_cuda import HEAD_DIM, LONG_CONTEXT

        if not self.attn_cuda or cache_dtype != torch.bfloat16 or head_dim != HEAD_DIM:
            return None
        return dict(LONG_CONTEXT)

    def _cuda_serves(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext, scaled: bool
    ) -> bool:
        """Whether the CUDA decode kernel serves this call; where it does not build, says why once and stops asking."""
        from worker.kernels.paged_decode_cuda import LONG_CONTEXT, MAX_BATCH, library, supports

        assert ctx.block_tables is not None
        tables, lens = ctx.block_tables, ctx.seqlen.input_lengths
        if q.shape[0] > MAX_BATCH or ctx.seqlen.max_k >= LONG_CONTEXT.get(q.shape[0], 0):
            return False
        if supports(q, k_cache, v_cache, tables, lens, scaled) is not None:
            return False
        lib = library(*torch.cuda.get_device_capability(q.device))
        if isinstance(lib, str):
            log.warning("attn_cuda: the CUDA decode attention is not available (%s); the Triton kernels serve", lib)
            self.attn_cuda = False
            return False
        return True

    def prefill(
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
        """Each sequence's new tokens over its cached prefix (k_cache given, new tokens already stored) or
        over themselves alone (k_cache None; the scales then do not apply)."""
        return paged_prefill(
            q,
            k,
            v,
            k_cache,
            v_cache,
            ctx.block_tables,
            ctx.seqlen.cu_seqlen_q,
            ctx.seqlen.cache_lengths,
            scale,
            self.tiles,
            k_scale,
            v_scale,
        )

    def _varlen(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, scale: float
    ) -> torch.Tensor | None:
        """torch's FlashAttention varlen kernel for prefill without a cache; None where it does not apply."""
        if self.varlen_attn is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            return None
        cu, max_q = ctx.seqlen.cu_seqlen_q, ctx.seqlen.max_q
        try:
            return self.varlen_attn(q, k, v, cu, cu, max_q, max_q, scale=scale, window_size=(-1, 0))
        except (RuntimeError, TypeError, ValueError) as exc:  # unsupported build / signature: Triton from now on
            log.warning("torch varlen_attn unavailable (%s); using the Triton prefill kernel", exc)
            self.varlen_attn = None
            return None
