"""The `triton` attention backend: fused KV store, paged split-K decode, paged prefix/suffix prefill.

References the tests compare against: `worker.engine.kv_cache.store_kv` (store) and
`worker.layers.attention.TorchAttention.attend` (attend). All softmax math is fp32 (base 2: the
scale is folded with log2(e) so the kernels use exp2); inputs are fp16 / bf16 / fp32.

fp8 (e4m3) caches: every kernel takes the layer's K and V scales as pointers to fp32 scalars (0-d
tensors, e.g. views into KVCache.k_scales), loaded in-kernel, so CUDA graphs captured once follow any
later change of the scales. Store writes clamp(x / scale, ±448); attend reads fp8 rows, widens them
exactly (to fp32 for decode, to the query dtype for prefill's tl.dot) and applies the scales outside the
inner products: k_scale multiplies the scores, v_scale the output. Without scales the kernels are the
unscaled ones (SCALED is a constexpr).

KV cache per layer: [num_blocks, block_size, heads, head_dim]. Key position p of sequence b is row
p % block_size of block block_tables[b, p // block_size]; every kernel computes that address per
key row, so any power-of-two block_size works with any key tile BLOCK_N.

  store    one program per token: K and V rows [heads, head_dim] -> slot slots[t] (slot < 0: skipped,
           for padded CUDA-graph batches); converts to the cache dtype; `k_scale`/`v_scale` divide
           before the cast (IEEE division, as the reference), an fp8 cache clamps to ±448 first.
  decode   flash-decoding: grid (batch, heads, num_splits); a split owns an equal share of its own
           sequence's key tiles (computed in-kernel from input_lengths, so a fixed num_splits works
           under CUDA graphs), writes fp32 (max, sum, acc) partials; a second kernel merges splits with
           the log-sum-exp rule. num_splits == 1 writes the output directly.
  prefill  grid (query tiles of all sequences, heads); tile -> (sequence, tile index) is built with
           torch ops (no host sync). A tile at absolute positions cache_len + [m*BM, (m+1)*BM) walks key
           tiles below its first query without masks, then the diagonal tiles with the causal mask.
           Reads K/V from the paged cache, or (no cache) straight from the new tokens' k/v; on CUDA the
           no-cache case goes to torch's FlashAttention `varlen_attn` when it is available. Prompts
           without cached tokens take that path with an fp8 cache too: they attend over their
           unquantised K/V (as vLLM does); suffix prefill and decode read the fp8 cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from worker.engine.kv_cache import FP8, Scale
from worker.layers.context import ForwardContext

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
# finite "minus infinity" for running maxima: empty rows and splits never produce NaN
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)
FP8_MAX: tl.constexpr = tl.constexpr(448.0)  # largest finite float8e4nv (= torch.float8_e4m3fn)

try:  # FlashAttention-2 inside PyTorch (torch >= 2.10); causal only with window_size=(-1, 0)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _torch_varlen_attn = None


# ----------------------------------------------------------------------------------------- store
@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, k_scale_ptr, v_scale_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cr, stride_ch, num_heads,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     SCALED: tl.constexpr, FP8: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (h[:, None] < num_heads) & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    if SCALED:
        k = tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr))
        v = tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr))
    if FP8:  # torch's cast turns out-of-range values into NaN: clamp like the reference (the cast then rounds
        k = tl.minimum(tl.maximum(k.to(tl.float32), -FP8_MAX), FP8_MAX)  # to nearest even, as torch's does)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -FP8_MAX), FP8_MAX)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr + h[:, None] * stride_ch + d[None, :]
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- decode
@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, acc_ptr,
                         k_scale_ptr, v_scale_ptr, scale_log2e, num_splits, stride_qt, stride_qh, stride_cb,
                         stride_cr, stride_ch, stride_tb, stride_ot, stride_oh,
                         BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                         DIRECT: tl.constexpr, SCALED: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1)
    ctx_len = tl.load(lens_ptr + b)
    tiles_per_split = tl.cdiv(tl.cdiv(ctx_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx_len)

    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + h * stride_qh + d).to(tl.float32) * scale_log2e
    if SCALED:  # scores q·(k_fp8 × k_scale) = (q × k_scale)·k_fp8
        q = q * tl.load(k_scale_ptr)
    m_i = tl.full([], NEG_BIG, tl.float32)
    l_i = tl.zeros([], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        blk = tl.load(tables_ptr + b.to(tl.int64) * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
        rows = blk.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cr + h * stride_ch
        k = tl.load(kc_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))  # [BLOCK_N], log2 units
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(vc_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
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


@triton.jit
def _decode_reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    s = tl.arange(0, BLOCK_S)
    ok = s < num_splits
    part = (b * num_heads + h) * num_splits + s
    m = tl.load(m_ptr + part, mask=ok, other=NEG_BIG)
    l = tl.load(l_ptr + part, mask=ok, other=0.0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(acc_ptr + part.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # [S]: empty splits carry l = 0, acc = 0
    out = tl.sum(w[:, None] * acc, 0) / tl.maximum(tl.sum(w * l, 0), 1e-30)
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------- prefill
@triton.jit
def _kv_rows(pos, mask, seq, h, kv_start, tables_ptr, stride_tb, stride_b, stride_r, stride_h,
             PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Element offsets of key positions `pos` of sequence `seq`, head h: paged cache or packed k/v."""
    if PAGED:
        blk = tl.load(tables_ptr + seq.to(tl.int64) * stride_tb + pos // BLOCK_SIZE, mask=mask, other=0)
        return blk.to(tl.int64) * stride_b + (pos % BLOCK_SIZE) * stride_r + h * stride_h
    else:
        return (kv_start + pos).to(tl.int64) * stride_r + h * stride_h


@triton.jit
def _prefill_tile(q, acc, m_i, l_i, k_ptr, v_ptr, n0, seq, h, kv_start, q_pos, key_end, scale_log2e,
                  tables_ptr, stride_tb, stride_b, stride_r, stride_h,
                  PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL_MASK: tl.constexpr):
    pos = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if CAUSAL_MASK:
        valid = pos < key_end
        rows = _kv_rows(pos, valid, seq, h, kv_start, tables_ptr, stride_tb, stride_b, stride_r, stride_h,
                        PAGED, BLOCK_SIZE)
        k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    else:
        rows = _kv_rows(pos, pos >= 0, seq, h, kv_start, tables_ptr, stride_tb, stride_b, stride_r, stride_h,
                        PAGED, BLOCK_SIZE)
        k = tl.load(k_ptr + rows[:, None] + d[None, :])
        v = tl.load(v_ptr + rows[:, None] + d[None, :])
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale_log2e  # [BM, BN]
    if CAUSAL_MASK:
        s = tl.where((pos[None, :] <= q_pos[:, None]) & valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, cu_q_ptr, cache_lens_ptr, tile_seq_ptr, tile_m_ptr,
                    k_scale_ptr, v_scale_ptr, num_seqs, scale_log2e, stride_qt, stride_qh, stride_b, stride_r,
                    stride_h, stride_tb, stride_ot, stride_oh,
                    PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    if seq >= num_seqs:  # the grid is an upper bound on the number of tiles
        return
    q_start = tl.load(cu_q_ptr + seq)
    n_new = tl.load(cu_q_ptr + seq + 1) - q_start
    cache_len = 0
    if PAGED:
        cache_len = tl.load(cache_lens_ptr + seq)
    first_i = tl.load(tile_m_ptr + tile) * BLOCK_M
    i = first_i + tl.arange(0, BLOCK_M)  # index among the sequence's new tokens
    row_ok = i < n_new
    q_pos = cache_len + i  # absolute positions: query q_pos sees keys 0..q_pos
    d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + i).to(tl.int64) * stride_qt + h * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    if SCALED:  # fp8 keys enter tl.dot widened exactly to q's dtype; their scale multiplies the scores
        scale_log2e = scale_log2e * tl.load(k_scale_ptr)

    key_end = cache_len + tl.minimum(n_new, first_i + BLOCK_M)  # exclusive: the tile's last query + 1
    full_end = ((cache_len + first_i) // BLOCK_N) * BLOCK_N  # keys below: visible to every query of the tile
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, k_ptr, v_ptr, n0, seq, h, q_start, q_pos, key_end,
                                      scale_log2e, tables_ptr, stride_tb, stride_b, stride_r, stride_h,
                                      PAGED, BLOCK_SIZE, HEAD_DIM, BLOCK_N, False)
    for n0 in range(full_end, key_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, k_ptr, v_ptr, n0, seq, h, q_start, q_pos, key_end,
                                      scale_log2e, tables_ptr, stride_tb, stride_b, stride_r, stride_h,
                                      PAGED, BLOCK_SIZE, HEAD_DIM, BLOCK_N, True)
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    if SCALED:
        out = out * tl.load(v_scale_ptr)
    o_rows = (q_start + i).to(tl.int64) * stride_ot + h * stride_oh
    tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------- python
def choose_num_splits(batch: int, heads: int, max_k: int, block_n: int, sm_count: int,
                      max_splits: int = 16) -> int:
    """Splits per (sequence, head) for decode: enough programs to fill the GPU (~2 per SM), each split
    covering at least two key tiles of the longest context, at most `max_splits`."""
    by_length = max(1, max_k // (2 * block_n))
    by_occupancy = max(1, -(-2 * sm_count // max(1, batch * heads)))
    return max(1, min(max_splits, by_length, by_occupancy))


def prefill_tile_map(cu_seqlen_q: torch.Tensor, num_tokens: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query tile -> (sequence, tile index within it), with torch ops on cu_seqlen_q's device (no sync).

    The map has num_tokens // block_m + B entries (an upper bound on the tiles); spare entries point
    at sequence B, which the kernel skips."""
    num_seqs = cu_seqlen_q.numel() - 1
    n_new = (cu_seqlen_q[1:] - cu_seqlen_q[:-1]).long()  # [B]
    tiles = (n_new + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)  # [B]
    t = torch.arange(num_tokens // block_m + num_seqs, device=cu_seqlen_q.device)
    seq = torch.searchsorted(ends, t, right=True)  # [grid]: first sequence whose tiles end after t
    first_tile = (ends - tiles)[seq.clamp(max=num_seqs - 1)]
    return seq.to(torch.int32), (t - first_tile).to(torch.int32)


def _pow2(x: int, what: str) -> int:
    if x < 1 or x & (x - 1):
        raise ValueError(f"{what} must be a power of two, got {x}")
    return x


@dataclass(frozen=True)
class Tiles:
    """Tile shapes (powers of two) and warps. The defaults compile without register spills for head_dim
    128 on sm_90 in bf16/fp16 (ptxas -v); fp32 prefill (exact fp32 dots, not the serving path) uses at
    most 32 x 32 tiles and 4 warps."""

    prefill_m: int = 64  # query rows per program (tl.dot needs >= 16); 64x32x4w measured best on H200
    prefill_n: int = 32  # keys per inner step
    prefill_warps: int = 4
    decode_n: int = 32  # keys per inner step of a split
    decode_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("prefill_m", "prefill_n", "decode_n"):
            _pow2(getattr(self, name), name)

    def prefill(self, dtype: torch.dtype) -> tuple[int, int, int, int]:
        """(BLOCK_M, BLOCK_N, num_warps, num_stages) for inputs of `dtype`."""
        if dtype == torch.float32:
            return min(self.prefill_m, 32), min(self.prefill_n, 32), 4, 2
        return self.prefill_m, self.prefill_n, self.prefill_warps, 3


class TritonAttention:
    """Paged attention in Triton (GPU; the Triton interpreter runs it on CPU tensors for tests).

    `num_splits` fixes the decode split count (e.g. per captured CUDA-graph batch size); None picks it
    per call from the batch and the longest context (`choose_num_splits`)."""

    name = "triton"

    def __init__(self, num_splits: Optional[int] = None, tiles: Tiles = Tiles(), use_varlen_attn: bool = True):
        self.num_splits = num_splits
        self.tiles = tiles
        self.varlen_attn = _torch_varlen_attn if use_varlen_attn else None

    # k, v: [T, heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, heads, head_dim]; slots: [T]
    def store(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slots: torch.Tensor, k_scale: Scale = None, v_scale: Scale = None) -> None:
        T, H, D = k.shape
        if T == 0:
            return
        _check_cache(k_cache, v_cache, H, D)
        k, v = _rows_contiguous(k), _rows_contiguous(v)
        ks, vs, scaled = _scale_args(k_scale, v_scale, k)
        _store_kv_kernel[(T,)](
            k, v, k_cache, v_cache, slots, ks, vs,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3], H,
            BLOCK_SIZE=_pow2(k_cache.shape[1], "block_size"), HEAD_DIM=_pow2(D, "head_dim"),
            BLOCK_H=triton.next_power_of_2(H), SCALED=scaled, FP8=k_cache.dtype == FP8, num_warps=4)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: Optional[torch.Tensor],
               v_cache: Optional[torch.Tensor], ctx: ForwardContext, scale: float, k_scale: Scale = None,
               v_scale: Scale = None, num_splits: Optional[int] = None) -> torch.Tensor:
        # q, k, v: [T, heads, head_dim] of the new tokens -> [T, heads, head_dim] in q's dtype
        _pow2(q.shape[2], "head_dim")
        q = _rows_contiguous(q)
        if not ctx.is_prefill:
            if k_cache is None:
                raise ValueError("decode needs the KV cache")
            return self.decode(q, k_cache, v_cache, ctx, scale, num_splits or self.num_splits, k_scale, v_scale)
        if k_cache is None or ctx.seqlen.max_cache_len == 0:  # fresh prompts: the new tokens are the context
            out = self._varlen(q, k, v, ctx, scale)
            if out is not None:
                return out
        return self.prefill(q, k, v, k_cache, v_cache, ctx, scale, k_scale, v_scale)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext,
               scale: float, num_splits: Optional[int] = None, k_scale: Scale = None,
               v_scale: Scale = None) -> torch.Tensor:
        """One new token per sequence (row b of q is sequence b), already stored in the cache."""
        B, H, D = q.shape
        _check_cache(k_cache, v_cache, H, D)
        ks, vs, scaled = _scale_args(k_scale, v_scale, q)
        if num_splits is None:
            sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
            num_splits = choose_num_splits(B, H, ctx.seqlen.max_k, self.tiles.decode_n, sm_count)
        out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
        if B == 0:
            return out
        f32 = dict(dtype=torch.float32, device=q.device)
        m = torch.empty(B, H, num_splits, **f32) if num_splits > 1 else out  # partials (unused at 1 split)
        l = torch.empty(B, H, num_splits, **f32) if num_splits > 1 else out
        acc = torch.empty(B, H, num_splits, D, **f32) if num_splits > 1 else out
        tables = ctx.block_tables
        _decode_split_kernel[(B, H, num_splits)](
            q, k_cache, v_cache, tables, ctx.seqlen.input_lengths, out, m, l, acc, ks, vs, scale * LOG2E,
            num_splits, q.stride(0), q.stride(1), *k_cache.stride()[:3], tables.stride(0), out.stride(0),
            out.stride(1), BLOCK_SIZE=_pow2(k_cache.shape[1], "block_size"), HEAD_DIM=D,
            BLOCK_N=self.tiles.decode_n, DIRECT=num_splits == 1, SCALED=scaled, num_warps=self.tiles.decode_warps)
        if num_splits > 1:
            _decode_reduce_kernel[(B, H)](m, l, acc, out, num_splits, out.stride(0), out.stride(1), HEAD_DIM=D,
                                          BLOCK_S=triton.next_power_of_2(num_splits),
                                          num_warps=1 if D <= 64 else 2)
        return out

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: Optional[torch.Tensor],
                v_cache: Optional[torch.Tensor], ctx: ForwardContext, scale: float, k_scale: Scale = None,
                v_scale: Scale = None) -> torch.Tensor:
        """Causal attention of each sequence's new tokens over its cached prefix (k_cache given, new tokens
        already stored) or over the new tokens alone (k_cache None; the scales then do not apply)."""
        T, H, D = q.shape
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        if T == 0:
            return out
        cu = ctx.seqlen.cu_seqlen_q
        block_m, block_n, warps, stages = self.tiles.prefill(q.dtype)
        tile_seq, tile_m = prefill_tile_map(cu, T, block_m)
        paged = k_cache is not None
        ks, vs, scaled = _scale_args(k_scale, v_scale, q) if paged else (q, q, False)
        if paged:
            _check_cache(k_cache, v_cache, H, D)
            keys, values, block_size = k_cache, v_cache, _pow2(k_cache.shape[1], "block_size")
            tables, cache_lens = ctx.block_tables, ctx.seqlen.cache_lengths
            strides = k_cache.stride()[:3]
        else:
            keys, values, block_size = _rows_contiguous(k), _rows_contiguous(v), 1
            if keys.stride() != values.stride():
                keys, values = keys.contiguous(), values.contiguous()
            tables, cache_lens = cu, cu  # unused
            strides = (0, keys.stride(0), keys.stride(1))
        _prefill_kernel[(tile_seq.numel(), H)](
            q, keys, values, out, tables, cu, cache_lens, tile_seq, tile_m, ks, vs, cu.numel() - 1, scale * LOG2E,
            q.stride(0), q.stride(1), *strides, tables.stride(0), out.stride(0), out.stride(1),
            PAGED=paged, BLOCK_SIZE=block_size, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, SCALED=scaled,
            num_warps=warps, num_stages=stages)
        return out

    def _varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                scale: float) -> Optional[torch.Tensor]:
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


def _scale_args(k_scale: Scale, v_scale: Scale, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k_scale, v_scale) as fp32 scalar tensors on `like`'s device for the kernels' scale pointers, and
    whether to scale at all. Tensors pass as they are (no copy, no host sync: graph-safe); a python float
    becomes a new 0-d tensor; without scales both pointers are a dummy (`like`) the kernel never reads."""
    if k_scale is None and v_scale is None:
        return like, like, False

    def one(s: Scale) -> torch.Tensor:
        if isinstance(s, torch.Tensor):
            if s.numel() != 1 or s.dtype != torch.float32 or s.device != like.device:
                raise ValueError(f"a KV scale must be one fp32 number on {like.device}, got {s.dtype} "
                                 f"{tuple(s.shape)} on {s.device}")
            return s
        return torch.full((), 1.0 if s is None else float(s), dtype=torch.float32, device=like.device)

    return one(k_scale), one(v_scale), True


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """[T, heads, head_dim] with a unit stride on head_dim (views like qkv.unbind(1) pass as they are)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, head_dim: int) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"K and V caches differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != (heads, head_dim) or k_cache.stride(3) != 1:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not hold [*, *, {heads}, {head_dim}] rows")


__all__ = ["Tiles", "TritonAttention", "choose_num_splits", "prefill_tile_map"]
