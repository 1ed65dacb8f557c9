"""Paged decode (one new token per sequence, already stored in the cache): flash-decoding in Triton.

Grid (batch, heads, num_splits): a split owns an equal share of its own sequence's key tiles (computed
in-kernel from the context lengths, so a fixed num_splits works under CUDA graphs) and writes fp32
(max, sum, acc) partials; a second kernel merges the splits with the log-sum-exp rule. One split
writes the output directly. fp8 keys and values are widened to fp32 exactly. With
Tiles.decode_fused_reduce the last split of each (sequence, head) to finish merges them itself (an
arrival counter per (sequence, head) in a DecodeWorkspace): one launch instead of two.

With `pdl` (DecodeKernels.pdl, sm_90+) both kernels launch with programmatic dependent launch: each waits for
the previous kernel (gdc_wait) before its first load, so only the launch and ramp overlap; no arithmetic changes.

Bandwidth knobs (Tiles.decode_*, swept by scripts/tune_attention.py): the key tile (BLOCK_N), warps,
STAGES (tl.range software-pipelines the table, K and V loads of later tiles: without tl.dot in the loop
Triton pipelines nothing otherwise), LANES (each of the BLOCK_N rows keeps its own running max / sum /
accumulator, merged once after the loop, so the loop has no cross-warp reductions or barriers) and
PREFETCH (the next tile's K and V are loaded into registers before this tile is computed). NEWEST_APART
(Tiles.decode_newest_apart, the default): the splits share the tiles of the cached keys (all but the newest), and the
last split folds the newest key in after its loop, its row loaded before the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from worker.kernels.decode_tiles import load_tile, merge_splits, softmax_step
from worker.kernels.pdl import active, gdc_go, gdc_wait, launch_options
from worker.kernels.triton_attention import (
    LOG2E,
    NEG_BIG,
    Tiles,
    check_cache,
    choose_num_splits,
    pow2,
    rows_contiguous,
    scale_args,
)
from worker.ops import Scale

__all__ = ["DecodeWorkspace", "choose_num_splits", "paged_decode"]


@triton.jit(do_not_specialize=["num_splits", "stride_tb"])  # one compile for any split count / table width
def _decode_split_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    counter_ptr,
    k_scale_ptr,
    v_scale_ptr,
    scale_log2e,
    num_splits,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cr,
    stride_ch,
    stride_tb,
    stride_ot,
    stride_oh,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
    LANES: tl.constexpr,
    PREFETCH: tl.constexpr,
    DIRECT: tl.constexpr,
    SCALED: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
    NEWEST_APART: tl.constexpr,
):
    gdc_wait(PDL)  # everything below reads what earlier kernels wrote (q, the cache, the lengths)
    gdc_go(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1)
    ctx_len = tl.load(lens_ptr + b)
    keys = tl.maximum(ctx_len - 1, 0) if NEWEST_APART else ctx_len  # the keys the splits' tiles cover
    tiles_per_split = tl.cdiv(tl.cdiv(keys, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, keys)
    table_ptr = tables_ptr + b.to(tl.int64) * stride_tb

    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + h * stride_qh + d).to(tl.float32) * scale_log2e
    if SCALED:  # scores q·(k_fp8 × k_scale) = (q × k_scale)·k_fp8
        q = q * tl.load(k_scale_ptr)
    if NEWEST_APART:  # the newest key's row: the last split's, of a non-empty context (valid nowhere else)
        own = (split == num_splits - 1) & (ctx_len > 0)
        first, stop = keys, tl.where(own, ctx_len, 0)  # the newest position; other splits read nothing
        k_new, v_new, new_valid = load_tile(
            kc_ptr, vc_ptr, table_ptr, first, stop, h, stride_cb, stride_cr, stride_ch, BLOCK_SIZE, HEAD_DIM, 1
        )
    if LANES:
        m_i = tl.full([BLOCK_N], NEG_BIG, tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    else:
        m_i = tl.full([], NEG_BIG, tl.float32)
        l_i = tl.zeros([], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
    if PREFETCH:  # k, v: this tile's rows, loaded one iteration ahead (rows past `end` are 0)
        k, v, _ = load_tile(
            kc_ptr, vc_ptr, table_ptr, start, end, h, stride_cb, stride_cr, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_N
        )
        for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
            k_next, v_next, _ = load_tile(
                kc_ptr,
                vc_ptr,
                table_ptr,
                n0 + BLOCK_N,
                end,
                h,
                stride_cb,
                stride_cr,
                stride_ch,
                BLOCK_SIZE,
                HEAD_DIM,
                BLOCK_N,
            )
            valid = n0 + tl.arange(0, BLOCK_N) < end
            m_i, l_i, acc = softmax_step(q, k, v, valid, m_i, l_i, acc, LANES)
            k, v = k_next, v_next
    else:
        for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
            k, v, valid = load_tile(
                kc_ptr, vc_ptr, table_ptr, n0, end, h, stride_cb, stride_cr, stride_ch, BLOCK_SIZE, HEAD_DIM, BLOCK_N
            )
            m_i, l_i, acc = softmax_step(q, k, v, valid, m_i, l_i, acc, LANES)
    if LANES:  # merge the rows' running softmaxes (rows never valid carry l = 0, acc = 0)
        m_row = m_i
        m_i = tl.max(m_row, 0)
        w = tl.exp2(m_row - m_i)
        l_i = tl.sum(l_i * w, 0)
        acc = tl.sum(acc * w[:, None], 0)
    if NEWEST_APART:  # the newest key folded into this split's softmax: a one-row step (no change where not valid)
        m_i, l_i, acc = softmax_step(q, k_new, v_new, new_valid, m_i, l_i, acc, False)
    if SCALED:  # Σ p (v_fp8 × v_scale) = v_scale Σ p v_fp8 (the split merge is linear in acc)
        acc = acc * tl.load(v_scale_ptr)

    if DIRECT:  # a single split: l_i >= 1 unless the context is empty (padding), then the output is 0
        out = acc / tl.maximum(l_i, 1e-30)
        tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))
    else:
        part = (b * num_heads + h) * num_splits + split
        tl.store(m_ptr + part, m_i)
        tl.store(l_ptr + part, l_i)
        tl.store(acc_ptr + part.to(tl.int64) * HEAD_DIM + d, acc)
        if FUSED_REDUCE:  # the last split of (b, h) to arrive merges them (all partials stored before the
            tl.debug_barrier()  # release; the acquire orders the merge's reads after every other split's)
            bh = b * num_heads + h
            if tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
                out = out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh
                merge_splits(m_ptr, l_ptr, acc_ptr, out, bh * num_splits, num_splits, HEAD_DIM, BLOCK_S, True)
                tl.atomic_xchg(counter_ptr + bh, 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _decode_reduce_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    gdc_wait(PDL)
    gdc_go(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    part0 = (b * tl.num_programs(1) + h) * num_splits
    out = out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh
    merge_splits(m_ptr, l_ptr, acc_ptr, out, part0, num_splits, HEAD_DIM, BLOCK_S, False)


@dataclass
class DecodeWorkspace:
    """Arrival counters of the fused reduction, one int32 per (sequence, head), zero between launches (the
    merging program resets its own). Buffers are kept for the object's life: a CUDA graph captured with
    one keeps reading it."""

    buffers: dict[torch.device, list[torch.Tensor]] = field(default_factory=dict)

    def counters(self, n: int, device: torch.device) -> torch.Tensor:
        held = self.buffers.setdefault(device, [])
        if not held or held[-1].numel() < n:
            held.append(torch.zeros(max(n, 8192), dtype=torch.int32, device=device))
        return held[-1]


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_k: int,
    scale: float,
    tiles: Tiles,
    num_splits: int | None = None,
    k_scale: Scale = None,
    v_scale: Scale = None,
    workspace: DecodeWorkspace | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Attention of each sequence's one new token over its whole cached context.

    q: [B, heads, head_dim] (row b is sequence b); block_tables: [B, max_blocks] int32; context_lens: [B]
    int32 (0: a padding row, output 0); max_k: the longest context (picks num_splits when None);
    workspace: the fused reduction's counters (tiles.decode_fused_reduce; None: zeroed per call); pdl: both
    kernels launch with programmatic dependent launch where it is active (worker/kernels/pdl.py).
    Returns [B, heads, head_dim] in q's dtype.
    """
    B, H, D = q.shape
    pow2(D, "head_dim")
    q = rows_contiguous(q)
    check_cache(k_cache, v_cache, H, D)
    ks, vs, scaled = scale_args(k_scale, v_scale, q)
    if num_splits is None:
        sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        num_splits = tiles.decode_splits(B, H, max_k, sm_count)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    m_part = l_part = acc_part = counters = out  # fp32 partials of the splits (unused at 1 split)
    fused = tiles.decode_fused_reduce and num_splits > 1
    if fused:
        counters = (workspace or DecodeWorkspace()).counters(B * H, q.device)
    if num_splits > 1:
        m_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
        l_part = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
        acc_part = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    on = active(pdl, q.device)
    _decode_split_kernel[(B, H, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        m_part,
        l_part,
        acc_part,
        counters,
        ks,
        vs,
        scale * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        BLOCK_SIZE=pow2(k_cache.shape[1], "block_size"),
        HEAD_DIM=D,
        BLOCK_N=tiles.decode_n,
        STAGES=tiles.decode_stages,
        LANES=tiles.decode_lanes,
        PREFETCH=tiles.decode_prefetch,
        DIRECT=num_splits == 1,
        SCALED=scaled,
        FUSED_REDUCE=fused,
        BLOCK_S=triton.next_power_of_2(num_splits),
        PDL=on,
        NEWEST_APART=tiles.decode_newest_apart,
        num_warps=tiles.decode_warps,
        **launch_options(on),
    )
    if num_splits > 1 and not fused:
        _decode_reduce_kernel[(B, H)](
            m_part,
            l_part,
            acc_part,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=D,
            BLOCK_S=triton.next_power_of_2(num_splits),
            PDL=on,
            num_warps=max(1, min(8, triton.next_power_of_2(num_splits) * D // 1024)),  # ~32 fp32 per thread
            **launch_options(on),
        )
    return out
