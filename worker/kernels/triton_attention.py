"""Triton paged-attention kernels: the pieces they share and the fused KV store.

Decode is in paged_decode.py, prefill in paged_prefill.py; `worker.layers.attention_triton.TritonAttention`
unpacks the ForwardContext into their plain-tensor arguments. The PyTorch references the tests compare
against are `worker.ops.store_kv` (store) and `worker.layers.attention.TorchAttention` (attend).

KV cache per layer: [num_blocks, block_size, heads, head_dim]; key position p of sequence b is row
p % block_size of block block_tables[b, p // block_size]. Every kernel computes that address per key
row, so any power-of-two block_size works with any key tile. Softmax math is fp32 in base 2 (the scale
is folded with log2(e) so the kernels use exp2); inputs are fp16 / bf16 / fp32.

fp8 (e4m3) caches: the kernels take the layer's K and V scales as pointers to fp32 scalars (e.g. views
into KVCache.k_scales), loaded in-kernel, so a CUDA graph captured once follows later changes of the
scales. Store writes clamp(x / scale, ±448); attention widens fp8 rows exactly and applies the scales
outside the inner products (k_scale on the scores, v_scale on the output). Without scales SCALED (a
constexpr) compiles the unscaled kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker import ops

LOG2E = 1.4426950408889634
NEG_BIG: tl.constexpr = tl.constexpr(-1.0e30)  # finite "minus infinity": empty rows and splits never give NaN
FP8_MAX: tl.constexpr = tl.constexpr(ops.FP8_MAX)


@dataclass(frozen=True)
class Tiles:
    """Tile shapes (powers of two), warps, pipeline stages and the decode split policy; every field is a
    knob that scripts/tune_attention.py sweeps (`Tiles.parse("decode_n=64,decode_stages=3")` builds one from
    a CLI string). fp32 prefill (exact fp32 dots, not the serving path) uses at most 32 x 32 tiles, 4 warps.
    The decode default compiles for sm_90 with Triton 3.6 and 3.9 without spills (120 registers, 35 KB of
    shared memory for the two-stage cp.async pipeline), bf16 and fp8 caches."""

    # Defaults from scripts/tune_attention.py on an H200 (BENCHMARKS.md, issue 17): 128x128 tiles, 8 warps, 3
    # stages are fastest for one 32,768-token prompt (18.5 ms vs 22.8 for 64x32x4w per layer's attention).
    prefill_m: int = 128  # query rows per program (tl.dot needs >= 16)
    prefill_n: int = 128  # keys per inner step
    prefill_warps: int = 8
    prefill_stages: int = 3  # software-pipelined K/V loads (tl.dot operands)
    prefill_fp8_stages: int = 2  # with an fp8 cache (3 stages of 128x128 tiles spill there; 2 were fastest)
    # Over a paged cache (chunks, prefix hits): 0 keeps the fields above; prefetch loads the next key tile's
    # block-table entries one step ahead (scripts/gpu_check_prefill.py compares both on the chunked rows).
    prefill_paged_m: int = 0
    prefill_paged_n: int = 0
    prefill_paged_warps: int = 0
    prefill_paged_stages: int = 0
    prefill_prefetch: bool = True
    # Decode: the best single config over ctx 2k/8k/32k x batch 1/16 (bf16 cache): 0.96-1.16x the KV floor at
    # 8k and 32k, where the kernel before issue 17 was 2.7x slower.
    decode_n: int = 32  # keys per inner step of a split
    decode_warps: int = 4
    decode_stages: int = 3  # >= 2: tl.range pipelines the table, K and V loads (no tl.dot, so only then)
    decode_lanes: bool = True  # per-row running softmax: no cross-warp reduction inside the key loop
    decode_prefetch: bool = False  # load the next tile's K/V before computing on this one (in registers)
    decode_fused_reduce: bool = True  # the last split to finish merges (one launch, no reduce kernel)
    # The splits share the tiles of the cached keys only and the last split folds the newest key in after its loop
    # (its row loaded before the loop): no tile for it alone where it starts one (a 513-key step: 16 full tiles of 32
    # and the newest), as paged_decode.cu does. On the H200 the bf16 7B step at 512-token contexts took 4.919-4.922 /
    # 6.671-6.678 / 8.777-8.782 ms at batch 8 / 32 / 64 with it against 4.964-5.004 / 6.724-6.737 / 8.833-8.861
    # without (scripts/ab_decode.py, 3 alternating rounds; BENCHMARKS.md, 2026-11-30, twelfth).
    decode_newest_apart: bool = True
    decode_ctas_per_sm: int = 2  # split policy: enough splits for this many programs per SM ...
    decode_min_tiles: int = 1  # ... each split at least this many key tiles of the longest context ...
    decode_max_splits: int = 16  # ... and at most this many splits

    def __post_init__(self) -> None:
        for name in ("prefill_m", "prefill_n", "decode_n"):
            pow2(getattr(self, name), name)
        for name in ("prefill_paged_m", "prefill_paged_n"):
            if getattr(self, name):
                pow2(getattr(self, name), name)
        for name in (
            "prefill_warps",
            "prefill_stages",
            "prefill_fp8_stages",
            "decode_warps",
            "decode_stages",
            "decode_max_splits",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def parse(cls, spec: str) -> Tiles:
        """`"decode_n=64,decode_lanes=1"` -> Tiles (unnamed fields keep their defaults)."""
        kw: dict[str, int | bool] = {}
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, value = item.partition("=")
            if name not in fields or not value:
                raise ValueError(f"bad tile setting {item!r}: expected name=value with name in {sorted(fields)}")
            kw[name] = value.lower() in ("1", "true", "yes") if fields[name] in (bool, "bool") else int(value)
        return cls(**kw)  # type: ignore[arg-type]

    def prefill(self, dtype: torch.dtype, fp8_cache: bool = False, paged: bool = False) -> tuple[int, int, int, int]:
        """(BLOCK_M, BLOCK_N, num_warps, num_stages) for inputs of `dtype` (over an fp8 cache when said; over
        a paged cache, the prefill_paged_* fields that are set)."""
        m, n = self.prefill_m, self.prefill_n
        warps, stages = self.prefill_warps, self.prefill_fp8_stages if fp8_cache else self.prefill_stages
        if paged:
            m, n = self.prefill_paged_m or m, self.prefill_paged_n or n
            warps, stages = self.prefill_paged_warps or warps, self.prefill_paged_stages or stages
        if dtype == torch.float32:
            return min(m, 32), min(n, 32), 4, 2
        return m, n, warps, stages

    def decode_splits(self, batch: int, heads: int, max_k: int, sm_count: int) -> int:
        """The split count of this policy (see choose_num_splits)."""
        return choose_num_splits(
            batch,
            heads,
            max_k,
            self.decode_n,
            sm_count,
            self.decode_max_splits,
            self.decode_ctas_per_sm,
            self.decode_min_tiles,
        )


def choose_num_splits(
    batch: int,
    heads: int,
    max_k: int,
    block_n: int,
    sm_count: int,
    max_splits: int = Tiles.decode_max_splits,
    ctas_per_sm: int = Tiles.decode_ctas_per_sm,
    min_tiles: int = Tiles.decode_min_tiles,
) -> int:
    """Splits per (sequence, head) for decode: enough programs for `ctas_per_sm` per SM, each split
    covering at least `min_tiles` key tiles of the longest context, at most `max_splits`.

    Under CUDA graphs pass the longest context the graph can see (the table width x block size): the
    count is fixed at capture and stays correct for shorter contexts (their extra splits are empty)."""
    by_length = max(1, max_k // (min_tiles * block_n))
    by_occupancy = max(1, -(-ctas_per_sm * sm_count // max(1, batch * heads)))
    return max(1, min(max_splits, by_length, by_occupancy))


def pow2(x: int, what: str) -> int:
    if x < 1 or x & (x - 1):
        raise ValueError(f"{what} must be a power of two, got {x}")
    return x


def scale_args(k_scale: ops.Scale, v_scale: ops.Scale, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k_scale, v_scale) as fp32 scalar tensors on `like`'s device for the kernels' scale pointers, and
    whether to scale at all. Tensors pass as they are (no copy, no host sync: graph-safe); a python float
    becomes a new 0-d tensor; without scales both pointers are a dummy (`like`) the kernel never reads."""
    if k_scale is None and v_scale is None:
        return like, like, False

    def one(s: ops.Scale) -> torch.Tensor:
        if isinstance(s, torch.Tensor):
            if s.numel() != 1 or s.dtype != torch.float32 or s.device != like.device:
                raise ValueError(
                    f"a KV scale must be one fp32 number on {like.device}, got {s.dtype} {tuple(s.shape)} on {s.device}"
                )
            return s
        return torch.full((), 1.0 if s is None else float(s), dtype=torch.float32, device=like.device)

    return one(k_scale), one(v_scale), True


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """[T, heads, head_dim] with a unit stride on head_dim (views like qkv.unbind(1) pass as they are)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, head_dim: int) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"K and V caches differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != (heads, head_dim) or k_cache.stride(3) != 1:
        raise ValueError(f"cache {tuple(k_cache.shape)} does not hold [*, *, {heads}, {head_dim}] rows")


# ----------------------------------------------------------------------------------------- store
@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slots_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cr,
    stride_ch,
    num_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SCALED: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (h[:, None] < num_heads) & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    if SCALED:  # IEEE division, as the reference
        k = tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr))
        v = tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr))
    if FP8:  # torch's cast turns out-of-range values into NaN: clamp like the reference (the cast then rounds
        k = tl.minimum(tl.maximum(k.to(tl.float32), -FP8_MAX), FP8_MAX)  # to nearest even, as torch's does)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -FP8_MAX), FP8_MAX)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr + h[:, None] * stride_ch + d[None, :]
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k_scale: ops.Scale = None,
    v_scale: ops.Scale = None,
) -> None:
    """`ops.store_kv` in one launch (one program per token); slots < 0 (padded CUDA-graph rows) are skipped.

    k, v: [T, heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, heads, head_dim]; slots: [T].
    """
    T, H, D = k.shape
    if T == 0:
        return
    check_cache(k_cache, v_cache, H, D)
    k, v = rows_contiguous(k), rows_contiguous(v)
    ks, vs, scaled = scale_args(k_scale, v_scale, k)
    _store_kv_kernel[(T,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        ks,
        vs,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride()[:3],
        H,
        BLOCK_SIZE=pow2(k_cache.shape[1], "block_size"),
        HEAD_DIM=pow2(D, "head_dim"),
        BLOCK_H=triton.next_power_of_2(H),
        SCALED=scaled,
        FP8=k_cache.dtype == ops.FP8,
        num_warps=4,
    )
