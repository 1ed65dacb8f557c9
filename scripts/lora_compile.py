"""Compile the "gemm" decode mode's LoRA kernels (worker/kernels/lora_rows.py, lora_norm.py) for a GPU target without a
GPU (Triton's bundled ptxas) at each pool rank, as their launchers launch them at the 7B shapes (the tiles they pick:
lora_rows.TILE, ln_1's shrink's columns by lora_rows.norm_columns; the integer arguments' specializations; fp
contraction off); report registers and local-memory spills. Exit status 1 if any spills (or a prefill kernel needs
more shared memory than the target has, below): a tile's registers hold
[columns, lanes] of B or A, and at serve's default --max-lora-rank 64 ln_1's shrink spilled 7 KB a thread with its
r_max-16 tile (issue 17, P2).

    python scripts/lora_compile.py                       # r_max 8, 16, 32, 64 at sm_90
    python scripts/lora_compile.py --ranks 64 --arch 100

Also the prefill shrink and expand (worker/kernels/lora.py) at every tile `_plan` picks for the 7B and 72B widths on
an H200's 132 SMs, one to 64 prompts of 2 to 4,096 tokens: each must fit the target's shared memory (the expand once
unrolled its loop over the K split, and one 64-token prompt at the 7B width asked for 528 KB of the H200's 227).

Not under TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import bench_common  # noqa: F401  (puts the repository on sys.path)
from tune_compile import _resources
from worker.kernels import lora, lora_rows
from worker.kernels.lora_norm import _norm_shrink_kernel
from worker.kernels.lora_rows import TILE

HIDDEN, QKV, MLP, LAYERS = 4096, 3 * 4096, 11008, 32  # the 7B shape: c_attn's input and output, the MLP's width
SLOTS = 32  # adapters (and slot 0, the base)


def _compile(fn: Any, args: dict[str, Any], const: dict[str, Any], arch: int, warps: int) -> dict[str, int]:
    """`fn` compiled as its launcher's call would be: `args` in the kernel's order, each a type ("*bf16", "fp32") or
    an int's value at the 7B shapes, which Triton's launch specializes (a 1 becomes a constant, a multiple of 16 gets
    the divisibility hint; pointers from torch are 16-byte aligned); fp contraction off, as every launcher asks."""
    sig: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    const = dict(const)
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif isinstance(args[name], str):
            sig[name] = args[name]
            if args[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif args[name] == 1:
            const[name], sig[name] = 1, "constexpr"
        else:
            sig[name] = "i32"
            if args[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(fn, sig, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=warps, num_stages=3, enable_fp_fusion=False),
    )
    return _resources(kernel)


def kernels(r_max: int, arch: int) -> dict[str, dict[str, int]]:
    """name -> resources of each kernel as its launcher launches it over pools of r_max lanes (T rows, SLOTS slots;
    the pools' strides as worker/adapters/slots.py lays them out)."""
    br = triton.next_power_of_2(r_max)
    warps, out, slots = TILE["num_warps"], {}, SLOTS + 1
    norm_bn = lora_rows.norm_columns(br)
    norm_tiles = triton.cdiv(HIDDEN, norm_bn)
    out[f"rms_norm_shrink (c_attn's h, {norm_bn} columns)"] = _compile(
        _norm_shrink_kernel,
        dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", sum_ptr="*bf16", a_ptr="*bf16",
             slots_ptr="*i64", part_ptr="*fp32", eps="fp32", inv_n="fp32", n_cols=HIDDEN, stride_x=HIDDEN,
             stride_res=HIDDEN, stride_out=HIDDEN, stride_sum=HIDDEN, stride_as=r_max * HIDDEN, stride_ar=HIDDEN,
             stride_pt=norm_tiles * br),
        dict(HAS_RESIDUAL=True, BLOCK=HIDDEN, BLOCK_N=norm_bn, R_MAX=r_max, BLOCK_R=br, PDL=False),
        arch, lora_rows.norm_warps(HIDDEN),
    )  # fmt: skip
    bn = TILE["block_n"]  # the expands' columns at every rank
    act_tiles = triton.cdiv(MLP, bn)
    partials = dict(y0_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i64", part_ptr="*fp32",
                    stride_bn=r_max)  # fmt: skip
    for name, n, tiles, y0 in (("c_attn's term", QKV, norm_tiles, 0), ("mlp.c_proj's", HIDDEN, act_tiles, HIDDEN)):
        out[f"expand_rows_partials ({name}, {bn} columns)"] = _compile(
            lora_rows._expand_rows_partials_kernel,
            dict(partials, N=n, TILES=tiles, stride_y0=y0, stride_y=n, stride_bs=n * r_max, stride_pt=tiles * br),
            dict(R_MAX=r_max, BLOCK_R=br, BLOCK_T=triton.next_power_of_2(tiles), BLOCK_N=bn, HAS_Y0=True, PDL=False),
            arch, warps,
        )  # fmt: skip
    out[f"expand_rows (attn.c_proj, {bn} columns)"] = _compile(
        lora_rows._expand_rows_kernel,
        dict(out_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i64", N=HIDDEN,
             N_TILES=triton.cdiv(HIDDEN, bn), H_OFFSET=HIDDEN, stride_o=HIDDEN + slots * r_max, stride_y=HIDDEN,
             stride_bs=HIDDEN * r_max, stride_bp=HIDDEN * r_max, stride_bn=r_max),
        dict(P=1, R_MAX=r_max, BLOCK_R=br, BLOCK_N=bn, PDL=False), arch, warps,
    )  # fmt: skip
    for lanes in (False, True):
        width = MLP + (slots * r_max if lanes else 0)  # the consumer's input row: its K lanes after the activation
        out[f"expand_rows_silu_mul (gate|up, {bn} columns{', K lanes' if lanes else ''})"] = _compile(
            lora_rows._expand_rows_act_kernel,
            dict(out_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i64", a2_ptr="*bf16",
                 part_ptr="*fp32", cnt_ptr="*i32", N=MLP, H_OFFSET=2 * MLP, SLOTS=slots,
                 stride_o=2 * MLP + slots * 2 * r_max, stride_y=width, stride_bs=2 * MLP * r_max,
                 stride_bp=MLP * r_max, stride_bn=r_max, stride_a2s=r_max * width,
                 stride_a2r=width, stride_pt=act_tiles * br),
            dict(R_MAX=r_max, BLOCK_R=br, BLOCK_N=bn, LIBDEVICE=True, SHRINK=True, R2_MAX=r_max, BLOCK_R2=br,
                 LANES=lanes, BLOCK_T=triton.next_power_of_2(act_tiles), BLOCK_S=triton.next_power_of_2(slots),
                 PDL=False),
            arch, warps,
        )  # fmt: skip
    return out


SMEM = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}  # bytes of shared memory a block may opt into
PREFILL_SMS = 132  # an H200's SMs: the prefill plans' K split fills them


def prefill_plans() -> set[tuple[int, int, int]]:
    """(block_m, split, shrink_r) of every prefill plan `lora._plan` picks for the 7B and 72B linears' widths (K,
    parts), pools of 16, 32 and 64 lanes, 1 to 64 prompts of 2 to 4,096 tokens (one token is decode's plan, whose
    expand holds no staged loads), on PREFILL_SMS SMs."""
    plans, num_sms = set(), lora._num_sms
    lora._num_sms = lambda device: PREFILL_SMS  # type: ignore[assignment]
    try:
        for k, parts in ((4096, 1), (4096, 2), (11008, 1), (8192, 1), (8192, 2), (24576, 1)):
            for r_max in (16, 32, 64):
                for segments in (1, 2, 8, 64):
                    for max_len in (2, 16, 32, 64, 128, 512, 4096):
                        x = torch.empty(segments * max_len, k, device="meta")
                        p = lora._plan(x, torch.empty(SLOTS + 1, parts, r_max, k, device="meta"), segments, max_len)
                        plans.add((p.block_m, p.split, p.shrink_r))
    finally:
        lora._num_sms = num_sms
    return plans


def prefill_kernels(arch: int) -> dict[str, dict[str, int]]:
    """name -> resources of the prefill shrink and expand at each tile of `prefill_plans` (the 7B width's strides)."""
    out, plans = {}, prefill_plans()
    common = dict(starts_ptr="*i32", lens_ptr="*i32", slots_ptr="*i32", ranks_ptr="*i32", stride_rp=1,
                  stride_rs=LAYERS * 5)  # fmt: skip
    split = max(p[1] for p in plans)  # the shrink's split only indexes its programs
    for block_m, shrink_r in sorted({(p[0], p[2]) for p in plans}):
        out[f"prefill shrink (BLOCK_M {block_m}, rank tile {shrink_r})"] = _compile(
            lora._shrink_kernel,
            dict(common, x_ptr="*bf16", a_ptr="*bf16", h_ptr="*fp32", K=HIDDEN, K_PER_SPLIT=64, stride_xt=HIDDEN,
                 stride_as=16 * HIDDEN, stride_ap=16 * HIDDEN, stride_ar=HIDDEN, stride_hs=64 * 16, stride_ht=16,
                 stride_hp=16),
            dict(SPLIT_K=split, BLOCK_M=block_m, BLOCK_R=shrink_r, BLOCK_K=64), arch, 4,
        )  # fmt: skip
    for block_m, split in sorted({p[:2] for p in plans}):
        out[f"prefill expand (BLOCK_M {block_m}, split {split})"] = _compile(
            lora._expand_kernel,
            dict(common, h_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16", N=QKV, N_TILES=QKV // 128,
                 stride_hs=64 * 16, stride_ht=16, stride_hp=16, stride_bs=QKV * 16, stride_bp=QKV * 16, stride_bn=16,
                 stride_yt=QKV),
            dict(SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=128, BLOCK_R=16, STORE=False), arch, 4,
        )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="8,16,32,64", help="pool ranks (r_max) to compile for")
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM))
    ap.add_argument("--no-prefill", action="store_true", help="only the decode kernels")
    args = ap.parse_args()
    bad = 0
    for r in (int(x) for x in args.ranks.split(",")):
        for name, res in kernels(r, args.arch).items():
            spill = res["stack"] != 0
            bad += spill
            print(f"r_max {r:3d}  {name:60s} {res['regs']:3d} registers, {res['stack']:5d} B local"
                  + ("  SPILLS" if spill else ""))  # fmt: skip
    if not args.no_prefill:
        for name, res in prefill_kernels(args.arch).items():
            over = res["smem"] > SMEM[args.arch]
            bad += over
            print(f"{name:66s} {res['regs']:3d} registers, {res['smem']:7d} B shared" + ("  TOO MUCH" if over else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
