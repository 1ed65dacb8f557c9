"""RoPE (+ logn) in place and the new keys/values into the paged KV cache, one launch (issue 17, P1 candidate
DecodeKernels.rope_store): fused.rotary_ followed by the store kernel of triton_attention.store_kv, for caches in
the model dtype (no fp8, no scales). Each program rotates its heads of one token exactly as fused.rotary_ does,
waits for its threads (the rotated k is read back from memory), then copies k and v to the token's slot; slots < 0
(padded CUDA-graph rows) are skipped. Copies only: the cache holds what the two kernels would write, bit for bit.

With a term (DecodeKernels.lora_side_term: c_attn's adapter term, computed on the side stream beside its base GEMM)
each program first adds the term to its heads of q, k and v in place, in fp32 and rounded once (qkv.add_(term)'s
values), then goes on as above. The term is complete when the kernel starts (a full dependency), so its loads come
before `gdc_wait`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.fused import _rotate_token
from worker.kernels.pdl import active, gdc_go, gdc_wait, launch_options


# fmt: off
@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, logn_ptr, kc_ptr, vc_ptr, slot_ptr, tq_ptr, tk_ptr,
                       tv_ptr, heads, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                       stride_st, stride_cb, stride_cr, stride_ch, HALF: tl.constexpr, REST: tl.constexpr,
                       HAS_LOGN: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                       HAS_TERM: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    if HAS_TERM:  # the term's views have q's, k's and v's strides
        d = tl.arange(0, HEAD_DIM)
        in_h = (h < heads)[:, None] & (d < HEAD_DIM)[None, :]
        oq = t * stride_qt + h[:, None] * stride_qh + d[None, :]
        ok = t * stride_kt + h[:, None] * stride_kh + d[None, :]
        ov = t * stride_vt + h[:, None] * stride_vh + d[None, :]
        tq = tl.load(tq_ptr + oq, mask=in_h, other=0.0)
        tk = tl.load(tk_ptr + ok, mask=in_h, other=0.0)
        tv = tl.load(tv_ptr + ov, mask=in_h, other=0.0)
    gdc_wait(PDL)
    gdc_go(PDL)
    if HAS_TERM:
        _add_in_place(q_ptr + oq, tq, in_h)
        _add_in_place(k_ptr + ok, tk, in_h)
        _add_in_place(v_ptr + ov, tv, in_h)
        tl.debug_barrier()  # the sums stored (by all its threads) before the rotation reads them back
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


@triton.jit
def _add_in_place(ptrs, term, mask):
    """x += term at ptrs, in fp32 and rounded once to x's dtype."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (x.to(tl.float32) + term.to(tl.float32)).to(x.dtype), mask=mask)
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
    term: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # views of q's, k's, v's strides
) -> None:
    """fused.rotary_(q, k, cos, sin, logn) then store_kv(k, v, k_cache, v_cache, slots), in one launch; with `term`
    (tq, tk, tv), q, k and v each get their term added first (in place, rounded once: q.add_(tq) ...)."""
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
    if term is not None and any(
        t.shape != x.shape or t.stride() != x.stride() or t.dtype != x.dtype for t, x in zip(term, (q, k, v))
    ):
        raise ValueError(
            "rotary_store_: the term's views need q's, k's and v's shapes, strides and dtype: "
            + ", ".join(f"{tuple(t.shape)} {t.stride()} {t.dtype}" for t in term)
        )
    if T == 0:
        return
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, 1024 // max(block_half, D)))
    rest = D - 2 * half
    on = active(pdl, q.device)
    _rope_store_kernel[(T, triton.cdiv(H, block_h))](
        q, k, v, cos, sin, logn if logn is not None else cos, k_cache, v_cache, slots, *(term or (q, k, v)), H,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        *k_cache.stride()[:3], HALF=half, REST=rest, HAS_LOGN=logn is not None, BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=D, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_REST=triton.next_power_of_2(max(rest, 16)),
        HAS_TERM=term is not None, PDL=on, num_warps=4, enable_fp_fusion=False, **launch_options(on),
    )  # fmt: skip
