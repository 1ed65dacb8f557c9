"""RMSNorm with the next linear's adapter shrink in the same launch (DecodeKernels.lora_norm_shrink, issue 17, P2).

In LoRA's "gemm" decode mode (worker/layers/lora.py) c_attn's h = RMSNorm(x + residual) · A[slot]ᵀ comes from ln_1's
kernel instead of from A rows in c_attn's GEMM: one program per tile of a row computes fused.rms_norm's values for
its columns (each program sums the squares of the whole row first, in fused.rms_norm's order, so the outputs are the
same) and this tile's share of h in fp32, which the term's expand sums (worker/kernels/lora_rows.py
`lora_term_rows_partials` / `lora_expand_rows_partials`). The tile is lora_rows.TILE["norm_block_n"] columns, fewer
past 16 lanes a slot (lora_rows.norm_columns: the A tile's registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.lora_rows import norm_columns, norm_warps
from worker.kernels.pdl import active, gdc_go, gdc_wait, launch_options


# fmt: off
@triton.jit
def _norm_shrink_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, a_ptr, slots_ptr, part_ptr, eps, inv_n, n_cols,
                        stride_x, stride_res, stride_out, stride_sum, stride_as, stride_ar, stride_pt,
                        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, R_MAX: tl.constexpr,
                        BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    """fused.rms_norm's (RMSNorm(s), s = x + residual) for BLOCK_N columns of a row, and this tile's share of the
    consumer's h, Σ_n out[n] · A[slot, r, n] in fp32 over the stored (rounded) values, into part_ptr[t, tile, r].
    Each program sums the squares of the whole row (as fused.rms_norm does), then writes its own columns."""
    t = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_cols
    offs_r = tl.arange(0, BLOCK_R)
    a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + offs_n[None, :],
                mask=(offs_r < R_MAX)[:, None] & mask_n[None, :], other=0.0)  # pool data: before the wait
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0)
    gdc_wait(PDL)
    gdc_go(PDL)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0)
    xt = tl.load(x_ptr + t * stride_x + offs_n, mask=mask_n, other=0.0)
    if HAS_RESIDUAL:  # s = x + residual, rounded to the model dtype
        r = tl.load(res_ptr + t * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        rt = tl.load(res_ptr + t * stride_res + offs_n, mask=mask_n, other=0.0)
        xt = (xt.to(tl.float32) + rt.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + t * stride_sum + offs_n, xt, mask=mask_n)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, 0) * inv_n  # torch's CUDA mean: sum * (1/n)
    normed = (xt.to(tl.float32) * tl.math.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)
    out = (normed.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t * stride_out + offs_n, out, mask=mask_n)
    h = tl.sum(a.to(tl.float32) * out.to(tl.float32)[None, :], axis=1)  # [BR]
    tl.store(part_ptr + t * stride_pt + tile * BLOCK_R + offs_r, h)
# fmt: on


def rms_norm_shrink(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    a_pool: torch.Tensor,
    slots: torch.Tensor,
    pdl: bool = False,
    block_n: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused.rms_norm(x, weight, eps, residual) = (out, s), and the consumer's h from out in fp32 partials per tile
    of block_n columns, [T, tiles, next_power_of_2(r_max)] (`lora_expand_rows_partials` / `lora_term_rows_partials`
    sum them), in one launch (DecodeKernels.lora_norm_shrink: c_attn's shrink inside ln_1). a_pool: the consumer's
    A pool [slots, 1, r_max, H] (lanes past a slot's rank zero, slot 0 all zero), slots: [T], each row's slot."""
    T, H = x.shape
    if (
        weight.shape != (H,)
        or weight.dtype != x.dtype
        or (residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype))
        or a_pool.dim() != 4
        or a_pool.shape[1] != 1
        or a_pool.shape[3] != H
        or a_pool.stride(3) != 1
        or slots.shape != (T,)
        or x.stride(1) != 1
        or (residual is not None and residual.stride(1) != 1)
    ):
        raise ValueError(
            f"rms_norm_shrink: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, "
            f"residual {None if residual is None else tuple(residual.shape)}, A pool {tuple(a_pool.shape)}, "
            f"slots {tuple(slots.shape)}"
        )
    br = triton.next_power_of_2(a_pool.shape[2])
    block_n = block_n or norm_columns(br)
    tiles = triton.cdiv(H, block_n)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    total = x if residual is None else torch.empty(T, H, dtype=x.dtype, device=x.device)
    parts = torch.empty(T, tiles, br, dtype=torch.float32, device=x.device)
    if T == 0:
        return out, total, parts
    block = triton.next_power_of_2(H)
    on = active(pdl, x.device)
    res = residual if residual is not None else x
    _norm_shrink_kernel[(T, tiles)](
        x, res, weight, out, total, a_pool, slots, parts, eps, 1.0 / H, H, x.stride(0), res.stride(0), out.stride(0),
        total.stride(0), a_pool.stride(0), a_pool.stride(2), parts.stride(0), HAS_RESIDUAL=residual is not None,
        BLOCK=block, BLOCK_N=block_n, R_MAX=a_pool.shape[2], BLOCK_R=br, PDL=on,
        num_warps=norm_warps(H), enable_fp_fusion=False, **launch_options(on),
    )  # fmt: skip
    return out, total, parts


__all__ = ["rms_norm_shrink"]
