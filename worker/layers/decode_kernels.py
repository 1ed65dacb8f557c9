"""Decode kernel choices for the batch-1 floor (issue 17, P1), chosen per model instance.

`DecodeKernels()` (every field off) is today's kernels: the reference that scripts/gpu_check_p1.py times each
candidate against. SERVED names the candidates the GPU showed faster and exact (graph == eager bit for bit), the
served default: `qwen-worker serve --decode-kernels` parses a list of names (`parse_decode_kernels`) and
`where_applies` keeps those that change anything on the shard's device. A layer that reads these has
`set_decode_kernels(opts)`; `apply_decode_kernels` hands one DecodeKernels to every such layer of a model.

Removed on 2026-11-29: norm_gemv (ln_1 / ln_2's residual add + RMSNorm in the prologue of c_attn's / gate_up's
Triton GEMV) was 2x slower on the H200: 7B decode step 9.21 vs 4.60 ms at batch 1, 5.98 vs 5.16 at batch 8, per
layer ln -> c_attn -> rope 80.6 vs 31.8 us; every GEMV program re-reads the whole rows for the sum of squares.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

# On the H200 (7B, graphed decode step, scripts/gpu_check_p1.py): pdl 4.427 vs 4.603 ms at batch 1 and 5.034 vs
# 5.157 at batch 8, rope_store 4.550 / 5.087; both bit for bit equal to the baseline. act_gemv is faster at
# M = 1 only (4.567 ms) and sums in another order than cuBLAS (not bitwise: off until a run shows the gain worth
# it). lora_pdl: see DecodeKernels.
SERVED = (
    "pdl",
    "rope_store",
    "lora_pdl",
    "lora_act_shrink",
    "gptq_cuda",
    "lora_term_first",
    "lora_norm_shrink",
    "lora_k_lanes",
    "gptq_mma",
    "gptq_act",
    "gptq_tc",
    "gptq_act_out",
    "attn_cuda",
    "gptq_tiled",
    "norm_fold",
)
ACT_GEMV_MAX_M = 1  # act_gemv serves decode batches of this many rows at most (measured 6-30x slower at M = 8)


@dataclass(frozen=True)
class DecodeKernels:
    """pdl: our Triton kernels of the decode step (GEMVs, fused elementwise, RoPE + store, paged decode
    attention) launch with programmatic dependent launch (worker/kernels/pdl.py), so each one's launch and ramp
    overlap the previous kernel's tail. CUDA sm_90+ only (else launched plainly); no arithmetic changes.
    act_gemv: mlp.c_proj (a float, un-wrapped row-parallel linear) at decode batches <= ACT_GEMV_MAX_M computes
    up * silu(gate) while reading its input in the Triton GEMV, and the SiLU-mul kernel disappears.
    rope_store: RoPE (+ logn) and the KV-cache store in one kernel (fused kernels, caches in the model dtype,
    unscaled; other caches keep the two kernels). Copies only: the cache is bit for bit the same.
    lora_pdl: the expands of LoRA's "gemm" decode mode (worker/kernels/lora_rows.py) launch with PDL too (they
    follow a cuBLAS GEMM). Served: in the 7B decode step (batch 32, 32 adapters) P2 0.888 / 0.886 with it vs
    0.879 / 0.875 without, in two runs on the H200, although beside the base matmuls alone it measured slower
    (1.05 vs 0.93 ms a step, scripts/gpu_check_lora_gemm.py).
    lora_act_shrink: in "gemm" mode, mlp.c_proj's h comes from the gate|up expand that writes its input (fp32
    partials per tile, summed by c_proj's expand) instead of from A rows in c_proj's GEMM, which then is the
    base GEMM alone (worker/kernels/lora_rows.py). Served: P2 +0.003-0.006 in each of 10 same-process pairs on two
    H200s (e.g. 7.49 vs 7.53 ms, 7.44 vs 7.47 ms at batch 32, 32 adapters; scripts/bench_lora.py --modes
    gemm+lora_act_shrink,gemm).
    gptq_cuda: Int4 GPTQ linears at decode steps of 1 or 2 rows take the CUDA GEMV (worker/kernels/gemv_cuda.py,
    built with nvcc on first use) instead of the Triton one, where it serves the layout and builds (else one warning
    says why). Served: the 7B Int4 batch-1 step 2.658 / 2.657 ms vs 2.880 / 2.865 with the Triton GEMV (two paired
    runs on an H200, scripts/bench_quant.py), batch 2 3.76 vs 4.81 ms; deterministic, so graph == eager bit for bit.
    lora_term_first: with lora_act_shrink, mlp.c_proj's term (h from the gate|up launch's partials, times B) is
    computed before its base GEMM, right after the launch that wrote the partials (PDL overlaps it), and cuBLAS adds
    it as the GEMM's C (addmm): no launch follows the GEMM. y = rn(x·Wᵀ + rn(term)) instead of
    rn(rn(x·Wᵀ) + rn(term)): one rounding fewer, so not bit for bit the reference's order. Served: faster in every
    same-process pair on the H200 (BENCHMARKS.md, 2026-11-30).
    lora_norm_shrink: in "gemm" mode, c_attn's h comes from ln_1's kernel (RMSNorm + residual add per tile of a row,
    each tile also writing its fp32 partials of h: lora_norm.rms_norm_shrink) instead of from A rows in c_attn's
    GEMM, which then is the base GEMM; the term is added from the partials after it, or (with lora_term_first) with
    the bias before it, as the GEMM's C. Served with lora_term_first (faster in every pair); alone it is slower.
    lora_k_lanes: where mlp.c_proj's B sits in K lanes beside its base weight (worker/adapters/slots.py: when
    slots·r_max is at most a quarter of its input width), lora_act_shrink's gate|up launch writes h, rounded, into the
    row's slot's lanes of c_proj's input (the last program of a row to arrive sums the row's partials), and c_proj's
    base GEMM over the lanes adds the term: no term launch. y = rn(x·Wᵀ + h·Bᵀ), the term unrounded inside the GEMM's
    fp32 sum. Served: never slower in a same-process pair on the H200, 0-0.03 ms a step faster (P2 +0.000-0.004 at
    batch 32, BENCHMARKS.md 2026-11-30).
    gptq_mma: Int4 GPTQ linears at decode steps of up to 48 rows and Int8 ones at up to 32 (quantized.MMA_MAX_M; Int4
    above gptq_cuda's 2 where that is on) take the CUDA tensor-core matmul (worker/kernels/gptq_mma.cu: each packed word
    read once, fed to mma.m16n8k16 as loaded) instead of the Triton GEMV (up to 8 rows) or dequantize + cuBLAS; where it
    serves the layout and builds, as gptq_cuda. Deterministic (split K summed in order), so graph == eager bit for bit.
    Served: the 7B Int4 step at batch 4 / 8 / 16 / 32 / 48 took 3.39 / 3.98 / 4.87 / 7.39 / 11.85 ms with it against
    5.17 / 5.85 / 7.87 / 11.40 / 12.48 without (bf16: 4.61 / 4.99 / 5.64 / 6.74 / 7.81; one H200, back to back), the
    72B-shaped step at batch 8 / 32 25.2 / 49.1 ms against 43.1 / 93.6 (BENCHMARKS.md, 2026-11-30).
    gptq_act: with gptq_cuda, a GPTQ mlp.c_proj (no act order, no adapter) at decode steps of one row computes
    up * silu(gate) while its CUDA GEMV stages its input (gptq_gemv.cu's kAct, fused.silu_mul's rounding), so the
    SiLU-mul launch goes. Bit for bit the same logits. Served: the 7B Int4 batch-1 step 2.618-2.634 ms with it
    against 2.652-2.661 without, in each of 4 alternating pairs on two H200s (BENCHMARKS.md, 2026-11-30).
    gptq_tc: with gptq_cuda, Int4 GPTQ linears at decode steps of 1-2 rows (quantized.TC_MIN_M / TC_MAX_M) take the
    tensor-core GEMV with the weights as mma's A operand and x's rows as its N (worker/kernels/gptq_tc.cu; each warp
    loads its chunks' x) instead of the FMA GEMVs; gptq_act's activation rides in it at 2 rows (x staged by the
    block), at one row in the FMA GEMV as before. Deterministic, so graph == eager bit for bit. Served: the 7B Int4
    step at batch 1 took 2.462 ms with it (its final plan) against 2.615-2.637 without, at batch 2 2.909 against
    3.749-3.768 (one H200; bf16 4.296 / 4.414; BENCHMARKS.md, 2026-11-30).
    gptq_act_out: with gptq_cuda and gptq_tc, a GPTQ Int4 gate_up at the decode steps gptq_tc serves writes up *
    silu(gate) from its GEMV's epilogue (gptq_tc.cu's kPair: a block owns the same gate and up columns), so
    mlp.c_proj runs gptq_tc without an activation inside (gptq_act then serves nothing there). The same values:
    each half rounded as the GEMV's output, then fused.silu_mul's rounding. Served: the 7B Int4 step at batch 1 took
    2.348-2.353 ms with it against 2.400-2.426 without, at batch 2 2.433-2.441 against 2.874-2.881 (three alternating
    pairs on one H200; bf16 4.248 / 4.358), and 2.263-2.295 / 2.371-2.392 with its blocks in one wave
    (gemv_cuda.plan_tc_pair; BENCHMARKS.md, 2026-11-30).
    attn_cuda: the triton backend's decode at batches of 1 and 2 (paged_decode_cuda.MAX_BATCH) over unscaled bf16
    caches of head_dim 128 takes the CUDA kernel (worker/kernels/paged_decode.cu: a thread block cluster a sequence and
    head, its first keys read before the PDL wait, the splits merged over distributed shared memory) instead of the
    Triton split + merge, with RoPE + store inside it where rope_store would run (TritonAttention.decode_rope: the
    cache bit for bit the same); where it builds (sm_90+, nvcc; else one warning says why). Deterministic, so graph ==
    eager bit for bit; another summation order than the Triton kernel's. Served: the 7B Int4 step at batch 1 1.928-1.934
    ms against 2.08-2.09 without it, batch 2 2.099-2.109 against 2.165-2.187 (one H200; BENCHMARKS.md, 2026-11-30,
    seventh).
    gptq_tiled: with gptq_cuda, gptq_tc and gptq_mma serving a GPTQ Int4 linear whose words tile, its qweight is
    re-laid out in place (gptq_format.tile_words: each 128-row chunk of 32 columns 2 KB in a row, a tensor-core step
    512 bytes in the order a warp's lanes read it) and every kernel that reads it takes that layout: gptq_tc, gptq_mma
    and the Triton prefill matmul (the FMA GEMVs and the Triton GEMV are then not used). Only addresses change, so
    the values are the row-major kernels' bit for bit. Served: the 7B Int4 step at batch 1 / 2 / 8 took 1.864 /
    2.022-2.026 / 3.916-3.922 ms with it against 1.911-1.912 / 2.091-2.092 / 3.969-3.970 without (two alternating
    rounds on one H200); 8,192-token prefill 183-187 ms against 181-183 (the same within the noise); GPU tests: the
    tiled kernels give the row-major bits, and a GPTQ model decodes the same (BENCHMARKS.md, 2026-11-30, ninth).
    norm_fold: with gptq_cuda, gptq_tc and gptq_act_out serving every linear of the layers at a decode step without
    adapters on one rank, ln_2 and every ln_1 but the first fold into the gptq_tc launches beside them: attn.c_proj
    and mlp.c_proj add the residual and write rn(s * weight) with each 32-column tile's sum of s² (worker/layers/
    norm.Deferred), c_attn and gate_up scale their product's rows by rsqrt(mean(s²) + eps) before the bias
    (gptq_tc.cu's kNorm): 63 RMSNorm launches fewer a 7B step. The normalized row is not rounded to bf16 before the
    product (rsqrt(...) · ((s * weight) · W) instead of rn(rn(s · rsqrt(...)) * weight) · W): not the unfused values
    bit for bit; within bf16's bound of the float64 reference; deterministic, so graph == eager bit for bit. Served: the
    7B Int4 step at batch 1 took 1.842-1.853 ms with it against 1.869-1.880 without, at batch 2 1.955-1.973 against
    2.025-2.030 (three alternating rounds on one H200; batch 8 unchanged: it folds at 1-2 rows); removing the two
    norms' launches outright (wrong values, timing only) bounds the gain at ~0.11 ms at batch 1 (BENCHMARKS.md,
    2026-11-30, ninth)."""

    pdl: bool = False
    act_gemv: bool = False
    rope_store: bool = False
    lora_pdl: bool = False
    lora_act_shrink: bool = False
    gptq_cuda: bool = False
    lora_term_first: bool = False
    lora_norm_shrink: bool = False
    lora_k_lanes: bool = False
    gptq_mma: bool = False
    gptq_act: bool = False
    gptq_tc: bool = False
    gptq_act_out: bool = False
    attn_cuda: bool = False
    gptq_tiled: bool = False
    norm_fold: bool = False

    def names(self) -> list[str]:
        """The fields switched on, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name)]

    def describe(self) -> str:
        return ",".join(self.names()) or "none"


CANDIDATES = tuple(f.name for f in fields(DecodeKernels))


def parse_decode_kernels(spec: str) -> DecodeKernels:
    """'none' -> all off; else a comma list of DecodeKernels field names (ValueError naming an unknown one)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["none"]:
        return DecodeKernels()
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise ValueError(
            f"decode kernels {spec!r}: unknown {unknown or 'empty list'}; "
            f"give 'none' or a comma list of {', '.join(CANDIDATES)}"
        )
    return DecodeKernels(**dict.fromkeys(names, True))


def where_applies(opts: DecodeKernels, device: torch.device, fused: bool = True) -> DecodeKernels:
    """The part of `opts` that changes anything on `device`: the candidates are Triton kernels of the CUDA
    decode path (off the GPU and under the interpreter the model keeps today's path); PDL needs sm_90+;
    rope_store replaces a fused kernel, so it needs the fused path (`fused`: the triton attention backend)."""
    if device.type != "cuda":
        return DecodeKernels()
    from worker.kernels import pdl

    if pdl.INTERPRETED:
        return DecodeKernels()
    return replace(
        opts,
        pdl=pdl.active(opts.pdl, device),
        rope_store=opts.rope_store and fused,
        lora_pdl=pdl.active(opts.lora_pdl, device),
        attn_cuda=opts.attn_cuda and fused and pdl.active(True, device),  # thread block clusters: sm_90+ too
    )


def launched(kernel: Callable[..., Any], opts: DecodeKernels) -> Callable[..., Any]:
    """A fused kernel's entry point as the layers call it: with pdl=True where opts.pdl."""
    return functools.partial(kernel, pdl=True) if opts.pdl else kernel


def apply_decode_kernels(root: nn.Module, opts: DecodeKernels) -> None:
    """Give `opts` to every layer under `root` that takes them (call before capturing CUDA graphs)."""
    for module in root.modules():
        setter = getattr(module, "set_decode_kernels", None)
        if setter is not None:
            setter(opts)
