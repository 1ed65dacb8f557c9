"""RoPE (+ logn) in place and the new keys/values into the paged KV cache, one launch (issue 17, P1 candidate
DecodeKernels.rope_store): fused.rotary_ followed by the store kernel of triton_attention.store_kv, for caches in
the model dtype (no fp8, no scales). Each program rotates its heads of one token exactly as fused.rotary_ does,
waits for its threads (the rotated k is read back from memory), then copies k and v to the token's slot; slots < 0
(padded CUDA-graph rows) are skipped. Copies only: the cache holds what the two kernels would write, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.fused import _rotate_token
from worker.kernels.pdl import active, gdc_go, gdc_wait, launch_options, level


# fmt: off
@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, logn_ptr, kc_ptr, vc_ptr, slot_ptr, heads, stride_qt,
                       stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st, stride_cb,
                       stride_cr, stride_ch, HALF: tl.constexpr, REST: tl.constexpr, HAS_LOGN: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, PDL: tl.constexpr):
    gdc_wait(PDL)
    gdc_go(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    _rotate_token(q_ptr, k_ptr, cos_ptr, sin_ptr, logn_ptr, heads, stride_qt, stride_qh, stride_kt, stride_kh,
                  stride_ct, stride_st, t, h, HALF, REST, HAS_LOGN, BLOCK_HALF, BLOCK_REST)
    tl.debug_barrier()  # this program's rotated k stored (by all its threads) before it is read back
    slot = tl.load(slot_ptr + t).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    mask = ((h < heads) & (h * 0 + slot >= 0))[:, None] & (d < HEAD_DIM)[None, :]  # slot < 0: a padded row
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr + h[:, None] * stride_ch + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
    tl.store(kc_ptr + dst, k, mask=mask)
    tl.store(vc_ptr + dst, v, mask=mask)
# fmt: on


def rotary_store_(
    q: torch.Tensor,  # [T, heads, head_dim], unit stride on head_dim (views of qkv are fine)
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,  # [T, half] fp32
    sin: torch.Tensor,
    logn: torch.Tensor | None,  # [T] fp32 or None
    k_cache: torch.Tensor,  # [num_blocks, block_size, heads, head_dim], q's dtype
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [T]
    pdl: bool = False,
) -> None:
    """fused.rotary_(q, k, cos, sin, logn) then store_kv(k, v, k_cache, v_cache, slots), in one launch."""
    T, H, D = q.shape
    half = cos.shape[-1]
    same = k.shape == q.shape == v.shape and k.dtype == q.dtype == v.dtype == k_cache.dtype == v_cache.dtype
    if not same or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (H, D) or 2 * half > D or D & (D - 1):
        raise ValueError(
            f"rotary_store_: q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} "
            f"{v.dtype}, caches {tuple(k_cache.shape)} {k_cache.dtype} / {tuple(v_cache.shape)} {v_cache.dtype}"
        )
    if any(x.stride(-1) != 1 for x in (q, k, v, cos, sin)) or k_cache.stride() != v_cache.stride():
        raise ValueError("rotary_store_ needs unit strides on the last dims and caches of one layout")
    if T == 0:
        return
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, 1024 // max(block_half, D)))
    rest = D - 2 * half
    on = active(pdl, q.device)
    _rope_store_kernel[(T, triton.cdiv(H, block_h))](
        q, k, v, cos, sin, logn if logn is not None else cos, k_cache, v_cache, slots, H,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        *k_cache.stride()[:3], HALF=half, REST=rest, HAS_LOGN=logn is not None, BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=D, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_REST=triton.next_power_of_2(max(rest, 16)),
        PDL=level(on, "rope_store", T), num_warps=4, enable_fp_fusion=False, **launch_options(on),
    )  # fmt: skip
