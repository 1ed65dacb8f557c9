"""The decode expand over the joint GEMM (issue 17, P2): y[t] = out[t, :P·N] + h[t, slot(t)] · B[slot(t)]ᵀ.

In the "gemm" decode mode (worker/layers/lora.py) a base linear's weight and its A pool share one allocation,
[out + slots·P·r_max, in] (worker/adapters/slots.py), so one cuBLAS GEMM gives, per token, the base output and
h = x · Aᵀ for every slot at once: the shrink rides in the base matmul, where its bytes cost ~0.3 ms a step at
batch 32 instead of 128 launches beside it. This kernel then writes the output: each token's own slot's h
(its r_max lanes; slot 0, the base, holds zeros) times that slot's B, rounded to the model dtype,
added to the base output in fp32 and rounded once (the reference's numerics, worker/kernels/lora_reference.py).

Tried and removed (2026-11-29, H200): the row-parallel targets' term added inside the next residual add +
RMSNorm (one program per row, each reading its slot's whole B, 128 KB at the 7B width): P2 fell from 0.88 to 0.81,
the norm being ~8 us slower with 32 programs than the expand's 512 plus the plain norm. Also tried and removed:
c_attn's term added inside the RoPE + KV-store kernel (one program per head and token, one launch fewer per layer):
in the same process, alternating, the step took 7.49-7.51 ms with it and 7.50 ms without (P2 0.885-0.887 vs
0.884-0.885), no gain for a second RoPE kernel (code in git history: a2e4821, d00104c).

With DecodeKernels.lora_act_shrink the gate|up launch also computes mlp.c_proj's h from the activation it writes
(fp32 partials per tile) and c_proj's expand sums them (`lora_expand_rows_partials`), so c_proj's GEMM is the base
GEMM alone: the A rows had made cuBLAS pick a slower split-K kernel there. Tried and removed (2026-11-29, H200):
c_proj's base GEMM as fp32 split-K planes (a strided bmm with out_dtype) summed in that expand, to drop cuBLAS's
reduce kernel: P2 0.882-0.886 vs 0.887-0.888 without (revert of 66d0eac).

Tried and removed (2026-11-30, H200): persistent launches of these expands (a fixed number of programs, 2-8 per
SM, each streaming (row, tile) items with the next item's loads issued before the current one's math): the gate|up
launch took 21.4 us a layer against 13.7 us per tile, c_attn's term 9.8 against 6.7, P2 0.855-0.882 against
0.891-0.899 in the same process (code in git history: eee5aa5).

DecodeKernels.lora_term_first: that expand runs before c_proj's GEMM instead, as the term alone
(`lora_term_rows_partials`, right after the launch that wrote the partials, so PDL overlaps it), and cuBLAS adds it as
its C: no launch follows the GEMM. DecodeKernels.lora_norm_shrink: ln_1's kernel (worker/kernels/lora_norm.py) writes
c_attn's h as fp32 partials the same way; c_attn's GEMM is the base one, its C the term plus the bias.

DecodeKernels.lora_k_lanes: where mlp.c_proj's B sits in K lanes beside its base weight (worker/adapters/slots.py),
the gate|up launch writes c_proj's input with its h already in place: each row's last program to arrive sums the row's
partials and writes h, rounded, into the row's slot's lanes (`_h_into_lanes`), and c_proj's GEMM over the lanes adds
the term: no term launch at all.

One program per (token, part, BLOCK_N columns). The row's slot (a graph input) and that slot's B (pool data, written
only between steps) are read before `gdc_wait` (PDL), so after the wait an expand has one memory round trip (h and the
base row, together) before its store; the gate|up launch then reads its consumer's A rows (below). B is read in whole
rows of r_max lanes (a rank mask on B would split its vector loads into scalar ones), and so are h and the partials: a
pool's lanes past a slot's rank are zero in A as in B (a slot is zeroed when it is freed and when a load into it fails,
free slots hold zeros, and pools grow into zeros), so h there is x · 0 = 0. Reading them whole takes the slot's rank
off the path from the slot to h (masking h by it cost a memory round trip after the slot's: 15.3 against 14.1 us for the
gate|up launch alone at P2's shapes, ncu, 2026-12-01). The gate|up launch reads the consumer's A rows after its
activation, not before the wait: fewer registers live (48 against 60: 10 blocks an SM against 8). Together, P2 0.8955
-> 0.9029 in one process (BENCHMARKS.md, 2026-12-01).
y is a new contiguous tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.fused import silu_mul_rn
from worker.kernels.paged_decode import DecodeWorkspace
from worker.kernels.pdl import INTERPRETED, active, gdc_go, gdc_wait, launch_options

# The expands' tile: BLOCK_N columns of one row per program, num_warps; rms_norm_shrink's columns a program (0: the
# expands'). scripts/bench_lora.py `--modes gemm@BNxW[xNORM_BN]` measures others in the same process.
TILE = {"block_n": 256, "num_warps": 4, "norm_block_n": 2048}
# The tiles above were measured with pools of r_max 16 (P2's adapters). ln_1's shrink (worker/kernels/lora_norm.py)
# holds [lanes, columns] of A in registers, so at more lanes its columns shrink in proportion (`norm_columns`): at
# serve's default --max-lora-rank 64 its 2048 columns spilled 7 KB a thread (sm_90, Triton 3.9), 512 do not. The
# expands' tiles keep their columns: no spill up to 64 lanes (scripts/lora_compile.py, tests/unit/test_lora_compile.py).
TILE_LANES = 16


def tile_columns(block_n: int, lanes: int) -> int:
    """A tile's columns for `lanes` lanes a slot: block_n up to TILE_LANES lanes, else block_n · TILE_LANES / lanes,
    but not under 16 (nor above block_n): columns × lanes stay at most block_n · TILE_LANES while that floor allows."""
    return max(min(block_n, 16), block_n * TILE_LANES // max(lanes, TILE_LANES))


def norm_columns(lanes: int) -> int:
    """ln_1's shrink's columns a program (worker/kernels/lora_norm.py) for an A pool of `lanes` lanes a slot."""
    return tile_columns(TILE["norm_block_n"] or TILE["block_n"], lanes)


def norm_warps(hidden: int) -> int:
    """ln_1's shrink's warps: every program sums the row's squares over next_power_of_2(hidden) columns."""
    return min(max(triton.next_power_of_2(hidden) // 512, 1), 16)


# fmt: off
@triton.jit
def _expand_rows_kernel(out_ptr, y_ptr, b_ptr, slots_ptr, N, N_TILES, H_OFFSET,
                        stride_o, stride_y, stride_bs, stride_bp, stride_bn,
                        P: tl.constexpr, R_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                        PDL: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1) // N_TILES
    n0 = (tl.program_id(1) % N_TILES) * BLOCK_N
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    b = _b_rows(b_ptr + slot * stride_bs + part * stride_bp, offs_n, mask_n, offs_r, stride_bn, R_MAX, BLOCK_R)
    gdc_wait(PDL)
    gdc_go(PDL)
    y = _part(out_ptr + t * stride_o, b, slot, part, offs_n, mask_n, offs_r, N, H_OFFSET, P, R_MAX)
    tl.store(y_ptr + t * stride_y + part * N + offs_n, y, mask=mask_n)


@triton.jit
def _b_rows(b_ptr, offs_n, mask_n, offs_r, stride_bn, R_MAX: tl.constexpr, BLOCK_R: tl.constexpr):
    """A slot's B rows offs_n, all r_max lanes [BN, BR]: whole rows when r_max is a power of two, so the loads are
    vectors (the pool's lanes past a rank are zero)."""
    ptrs = b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :]
    if R_MAX == BLOCK_R:
        return tl.load(ptrs, mask=mask_n[:, None], other=0.0)
    return tl.load(ptrs, mask=mask_n[:, None] & (offs_r < R_MAX)[None, :], other=0.0)


@triton.jit
def _part(row, b, slot, part, offs_n, mask_n, offs_r, N, H_OFFSET, P: tl.constexpr, R_MAX: tl.constexpr):
    """One part's output columns of a row: base + (h · Bᵀ rounded), added in fp32 and rounded once; h is the
    slot's r_max lanes in the joint GEMM's output row (read whole, as B is: see the module's docstring), b the slot's
    B rows [BN, BR]. The two loads here are an expand's only ones after `gdc_wait`, issued together: one memory round
    trip, which waits on nothing but the slot."""
    h = tl.load(row + H_OFFSET + (slot * P + part) * R_MAX + offs_r, mask=offs_r < R_MAX, other=0.0)
    y0 = tl.load(row + part * N + offs_n, mask=mask_n, other=0.0)
    return _add_term(y0, b, h)


@triton.jit
def _add_term(y0, b, h):
    """y0 + (h · Bᵀ rounded to y0's dtype), added in fp32 and rounded once (the reference's numerics); b [BN, BR]."""
    acc = tl.sum(b.to(tl.float32) * h.to(tl.float32)[None, :], axis=1)
    return (y0.to(tl.float32) + acc.to(y0.dtype).to(tl.float32)).to(y0.dtype)


@triton.jit
def _h_into_lanes(part_row, cnt_ptr, lanes_row, slot, tiles, SLOTS, R_MAX: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """After a program stored its partials of row t's h (part_row [tiles, BLOCK_R] fp32), the last of the row's
    `tiles` programs to arrive (cnt_ptr: the row's counter, which it resets) sums them in tile order (as
    lora_expand_rows_partials does) and writes h, rounded to the row's dtype, into the row's K lanes: its slot's
    R_MAX lanes, zeros in every other slot's (lanes_row: the first lane of the row). The stores before the
    counter's release and the loads after its acquire follow the split-K semaphore pattern (a CTA barrier, then one
    acq_rel atomic at GPU scope; the partials read past L1)."""
    tl.debug_barrier()
    if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == tiles - 1:
        offs_t = tl.arange(0, BLOCK_T)
        offs_r = tl.arange(0, BLOCK_R)
        parts = tl.load(part_row + offs_t[:, None] * BLOCK_R + offs_r[None, :], mask=(offs_t < tiles)[:, None],
                        other=0.0, cache_modifier=".cg")
        h = tl.sum(parts, axis=0).to(lanes_row.dtype.element_ty)
        offs_s = tl.arange(0, BLOCK_S)
        lanes = tl.where((offs_s == slot)[:, None], h[None, :], tl.zeros_like(h)[None, :])
        tl.store(lanes_row + offs_s[:, None] * R_MAX + offs_r[None, :], lanes,
                 mask=(offs_s < SLOTS)[:, None] & (offs_r < R_MAX)[None, :])
        tl.store(cnt_ptr, 0)


@triton.jit
def _expand_rows_act_kernel(out_ptr, y_ptr, b_ptr, slots_ptr, a2_ptr, part_ptr, cnt_ptr, N, H_OFFSET,
                            SLOTS, stride_o, stride_y, stride_bs, stride_bp, stride_bn,
                            stride_a2s, stride_a2r, stride_pt,
                            R_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, LIBDEVICE: tl.constexpr,
                            SHRINK: tl.constexpr, R2_MAX: tl.constexpr, BLOCK_R2: tl.constexpr, LANES: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    """A gate|up target (P = 2): y[t, n] = up · silu(gate) of the two parts' outputs, each the expand's value.
    SHRINK: also this tile's share of the consumer's h, Σ_n y[t, n] · A2[slot, r, n] in fp32 over the stored
    (rounded) values, into part_ptr[t, tile, r] (the consumer's expand sums the tiles: lora_expand_rows_partials).
    LANES: y's rows go on past N with the consumer's K lanes, into which the row's last program writes h
    (`_h_into_lanes`)."""
    # LANES: a row's tiles launch together (grid [tiles, T]), so each row's last program comes early, not all in the
    # last wave
    t = tl.program_id(1 if LANES else 0).to(tl.int64)
    tile = tl.program_id(0 if LANES else 1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    b_gate = _b_rows(b_ptr + slot * stride_bs, offs_n, mask_n, offs_r, stride_bn, R_MAX, BLOCK_R)
    b_up = _b_rows(b_ptr + slot * stride_bs + stride_bp, offs_n, mask_n, offs_r, stride_bn, R_MAX, BLOCK_R)
    gdc_wait(PDL)
    gdc_go(PDL)
    gate = _part(out_ptr + t * stride_o, b_gate, slot, 0, offs_n, mask_n, offs_r, N, H_OFFSET, 2, R_MAX)
    up = _part(out_ptr + t * stride_o, b_up, slot, 1, offs_n, mask_n, offs_r, N, H_OFFSET, 2, R_MAX)
    act = silu_mul_rn(gate, up, LIBDEVICE).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + t * stride_y + offs_n, act, mask=mask_n)
    if SHRINK:  # the consumer's A rows of this tile [BR2, BN], read after the activation: fewer registers live
        offs_r2 = tl.arange(0, BLOCK_R2)
        a2 = tl.load(a2_ptr + slot * stride_a2s + offs_r2[:, None] * stride_a2r + offs_n[None, :],
                     mask=(offs_r2 < R2_MAX)[:, None] & mask_n[None, :], other=0.0)
        h = tl.sum(a2.to(tl.float32) * act.to(tl.float32)[None, :], axis=1)  # [BR2]
        tl.store(part_ptr + t * stride_pt + tile * BLOCK_R2 + offs_r2, h)
        if LANES:
            _h_into_lanes(part_ptr + t * stride_pt, cnt_ptr + t, y_ptr + t * stride_y + N, slot, tl.num_programs(0),
                         SLOTS, R2_MAX, BLOCK_R2, BLOCK_T, BLOCK_S)


@triton.jit
def _expand_rows_partials_kernel(y0_ptr, y_ptr, b_ptr, slots_ptr, part_ptr, N, TILES,
                                 stride_y0, stride_y, stride_bs, stride_bn, stride_pt,
                                 R_MAX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                                 BLOCK_N: tl.constexpr, HAS_Y0: tl.constexpr, PDL: tl.constexpr):
    """y[t] = y0[t] + h · B[slot]ᵀ (one part) where h = Σ over TILES of the producer's fp32 partials (tile order),
    rounded to the model dtype: the value of the joint GEMM's h with its sum in another order. Without y0
    (HAS_Y0 false) y[t] is the term alone, rounded: the C that the base GEMM then adds (lora_term_rows_partials)."""
    t = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * BLOCK_N
    slot = tl.load(slots_ptr + t).to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    b = _b_rows(b_ptr + slot * stride_bs, offs_n, mask_n, offs_r, stride_bn, R_MAX, BLOCK_R)
    gdc_wait(PDL)
    gdc_go(PDL)
    offs_t = tl.arange(0, BLOCK_T)
    parts = tl.load(part_ptr + t * stride_pt + offs_t[:, None] * BLOCK_R + offs_r[None, :],
                    mask=(offs_t < TILES)[:, None] & (offs_r < R_MAX)[None, :], other=0.0)
    if HAS_Y0:
        y0 = tl.load(y0_ptr + t * stride_y0 + offs_n, mask=mask_n, other=0.0)
    else:
        y0 = tl.zeros([BLOCK_N], dtype=y_ptr.dtype.element_ty)
    y = _add_term(y0, b, tl.sum(parts, axis=0).to(y0.dtype))
    tl.store(y_ptr + t * stride_y + offs_n, y, mask=mask_n)
# fmt: on


def _check(name: str, out: torch.Tensor, n_out: int, b_pool: torch.Tensor, slots: torch.Tensor) -> None:
    T = out.shape[0]
    S, P, N, r_max = b_pool.shape
    if (
        n_out != P * N
        or out.shape[1] != n_out + S * P * r_max
        or out.stride(-1) != 1
        or b_pool.stride(-1) != 1
        or slots.shape != (T,)
    ):
        raise ValueError(
            f"{name}: out {tuple(out.shape)} with {n_out} base columns, B pool {tuple(b_pool.shape)}, "
            f"slots {tuple(slots.shape)}"
        )


def lora_expand_rows(
    out: torch.Tensor,
    n_out: int,
    b_pool: torch.Tensor,
    slots: torch.Tensor,
    pdl: bool = False,
    block_n: int = 0,
) -> torch.Tensor:
    """y [T, n_out] = out[:, :n_out] + the adapter term of each row's slot, from the joint GEMM's output.

    out: [T, n_out + slots·P·r_max] (row stride free, unit column stride): the base output, then h of
    slot s, part p at columns n_out + (s·P + p)·r_max; b_pool: [slots, P, n_out / P, r_max], zero in the lanes
    at or past each slot's rank (the pool's invariant: B is read whole, for vector loads), as A is (so h is zero
    there: read whole too; slot 0, the base, is all zeros); slots: [T], one per row.
    pdl: launch with programmatic dependent launch where it is active (sm_90+, compiled)."""
    _check("lora_expand_rows", out, n_out, b_pool, slots)
    T, (_, P, N, r_max) = out.shape[0], b_pool.shape
    y = torch.empty(T, n_out, dtype=out.dtype, device=out.device)
    if T == 0:
        return y
    block_n = block_n or TILE["block_n"]
    n_tiles = triton.cdiv(N, block_n)
    on = active(pdl, out.device)
    _expand_rows_kernel[(T, P * n_tiles)](
        out, y, b_pool, slots, N, n_tiles, n_out, out.stride(0), y.stride(0), *b_pool.stride()[:3], P=P,
        R_MAX=r_max, BLOCK_R=triton.next_power_of_2(r_max), BLOCK_N=block_n, PDL=on,
        num_warps=TILE["num_warps"],
        enable_fp_fusion=False, **launch_options(on),
    )  # fmt: skip
    return y


def lora_expand_rows_silu_mul(
    out: torch.Tensor,
    n_out: int,
    b_pool: torch.Tensor,
    slots: torch.Tensor,
    pdl: bool = False,
    block_n: int = 0,
    shrink: torch.Tensor | None = None,
    lanes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fused.silu_mul(lora_expand_rows(...)) in one launch for a gate|up target (P = 2: gate, then up):
    [T, n_out / 2], the same values bit for bit. shrink: the consumer's A pool [slots, 1, r2_max, n_out / 2] (its
    input is this output: mlp.c_proj after gate|up); the same launch then also returns its h in fp32 partials per
    tile, [T, tiles, next_power_of_2(r2_max)], which `lora_expand_rows_partials` sums (else None). lanes (with
    shrink): instead of the partials, the consumer's joint input [T, n_out / 2 + slots·r2_max], the activation then
    each row's h (the partials' sum, rounded) in its slot's K lanes and zeros in the others' (the consumer's GEMM over
    its JointWeight.lanes then adds the term); the activation returned is a view of its first columns."""
    _check("lora_expand_rows_silu_mul", out, n_out, b_pool, slots)
    T, (S, P, N, r_max) = out.shape[0], b_pool.shape
    if P != 2:
        raise ValueError(f"lora_expand_rows_silu_mul: a gate|up pool has 2 parts, not {P}")
    if shrink is not None and (
        shrink.dim() != 4 or shrink.shape[:2] != (b_pool.shape[0], 1) or shrink.shape[3] != N or shrink.stride(3) != 1
    ):
        raise ValueError(f"lora_expand_rows_silu_mul: the consumer's A pool {tuple(shrink.shape)} for {N} columns")
    if lanes and shrink is None:
        raise ValueError("lora_expand_rows_silu_mul: K lanes hold the consumer's h, so they need its A pool (shrink)")
    block_n = block_n or TILE["block_n"]
    tiles = triton.cdiv(N, block_n)
    r2 = shrink.shape[2] if shrink is not None else 1
    br2 = triton.next_power_of_2(r2)
    joint = torch.empty(T, N + S * r2, dtype=out.dtype, device=out.device) if lanes else None
    y = joint[:, :N] if joint is not None else torch.empty(T, N, dtype=out.dtype, device=out.device)
    parts = torch.empty(T, tiles, br2, dtype=torch.float32, device=out.device) if shrink is not None else None
    if T == 0:
        return y, joint if joint is not None else parts
    on = active(pdl, out.device)
    a2 = shrink if shrink is not None else b_pool
    counters = row_counters(T, out.device) if lanes else y
    _expand_rows_act_kernel[(tiles, T) if lanes else (T, tiles)](
        out, y, b_pool, slots, a2, parts if parts is not None else y, counters,
        N, n_out, S, out.stride(0), y.stride(0), *b_pool.stride()[:3], a2.stride(0), a2.stride(2),
        tiles * br2, R_MAX=r_max, BLOCK_R=triton.next_power_of_2(r_max), BLOCK_N=block_n, LIBDEVICE=not INTERPRETED,
        SHRINK=shrink is not None, R2_MAX=r2, BLOCK_R2=br2, LANES=lanes, BLOCK_T=triton.next_power_of_2(tiles),
        BLOCK_S=triton.next_power_of_2(S), PDL=on, num_warps=TILE["num_warps"], enable_fp_fusion=False,
        **launch_options(on),
    )  # fmt: skip
    return y, joint if joint is not None else parts


_COUNTERS = DecodeWorkspace()  # the K-lanes producer's own buffers (not the attention's)


def row_counters(rows: int, device: torch.device) -> torch.Tensor:
    """One int32 arrival counter per row for the K-lanes producer (`_h_into_lanes`): zero between launches, since
    each row's last program resets its own, so launches in one stream share one buffer per device; a larger one
    leaves the smaller alive for the CUDA graphs captured with it (DecodeWorkspace)."""
    return _COUNTERS.counters(rows, device)


def lora_expand_rows_partials(
    y0: torch.Tensor,
    parts: torch.Tensor,
    b_pool: torch.Tensor,
    slots: torch.Tensor,
    pdl: bool = False,
    block_n: int = 0,
) -> torch.Tensor:
    """y [T, N] = y0 + each row's adapter term (one part), its h the sum of `parts` [T, tiles, BR] (fp32, from
    lora_expand_rows_silu_mul's shrink) over the tiles, rounded to y0's dtype; b_pool [slots, 1, N, r_max] (lanes
    past a slot's rank zero), slots [T]: y0's rows' slots."""
    return _partials("lora_expand_rows_partials", y0, y0.shape, parts, b_pool, slots, pdl, block_n)


def lora_term_rows_partials(
    parts: torch.Tensor,
    b_pool: torch.Tensor,
    slots: torch.Tensor,
    pdl: bool = False,
    block_n: int = 0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The term alone, [T, N] in b_pool's dtype: lora_expand_rows_partials' y0 + term with y0 = 0 (each row's
    h · B[slot]ᵀ rounded once; base rows, slot 0, exact zeros), or y0 = bias [N] on every row, for a base GEMM to
    add as its C (DecodeKernels.lora_term_first)."""
    shape = (parts.shape[0], b_pool.shape[2])
    y0 = bias.expand(shape) if bias is not None else None
    return _partials("lora_term_rows_partials", y0, shape, parts, b_pool, slots, pdl, block_n)


def _partials(
    name: str,
    y0: torch.Tensor | None,
    shape: tuple[int, ...],
    parts: torch.Tensor,
    b_pool: torch.Tensor,
    slots: torch.Tensor,
    pdl: bool,
    block_n: int,
) -> torch.Tensor:
    T, N = shape
    S, P, n_b, r_max = b_pool.shape
    br = triton.next_power_of_2(r_max)
    if (
        P != 1
        or n_b != N
        or parts.shape[::2] != (T, br)
        or not parts.is_contiguous()
        or (y0 is not None and y0.stride(1) != 1)
        or b_pool.stride(-1) != 1
        or slots.shape != (T,)
    ):
        raise ValueError(
            f"{name}: y0 {tuple(shape)}, partials {tuple(parts.shape)}, B pool "
            f"{tuple(b_pool.shape)}, slots {tuple(slots.shape)}"
        )
    if y0 is None:
        y = torch.empty(T, N, dtype=b_pool.dtype, device=b_pool.device)
    else:
        y = torch.empty_like(y0, memory_format=torch.contiguous_format)
    if T == 0:
        return y
    block_n = block_n or TILE["block_n"]
    on = active(pdl, y.device)
    src = y0 if y0 is not None else y
    _expand_rows_partials_kernel[(T, triton.cdiv(N, block_n))](
        src, y, b_pool, slots, parts, N, parts.shape[1], src.stride(0), y.stride(0),
        b_pool.stride(0), b_pool.stride(2), parts.stride(0),
        R_MAX=r_max, BLOCK_R=br, BLOCK_T=triton.next_power_of_2(parts.shape[1]), BLOCK_N=block_n,
        HAS_Y0=y0 is not None, PDL=on, num_warps=TILE["num_warps"], enable_fp_fusion=False, **launch_options(on),
    )  # fmt: skip
    return y


__all__ = [
    "row_counters",
    "lora_expand_rows",
    "lora_expand_rows_partials",
    "lora_expand_rows_silu_mul",
    "lora_term_rows_partials",
]
