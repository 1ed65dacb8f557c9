"""Compile the "gemm" decode mode's LoRA kernels (worker/kernels/lora_rows.py, lora_norm.py) for a GPU target without a
GPU (Triton's bundled ptxas) at each pool rank, as their launchers launch them at the 7B shapes (the tiles they pick:
lora_rows.TILE, ln_1's shrink's columns by lora_rows.norm_columns; the integer arguments' specializations; fp
contraction off); report registers and local-memory spills. Exit status 1 if any spills: a tile's registers hold
[columns, lanes] of B or A, and at serve's default --max-lora-rank 64 ln_1's shrink spilled 7 KB a thread with its
r_max-16 tile (issue 17, P2).

    python scripts/lora_compile.py                       # r_max 8, 16, 32, 64 at sm_90
    python scripts/lora_compile.py --ranks 64 --arch 100

Not under TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import bench_common  # noqa: F401  (puts the repository on sys.path)
from tune_compile import _resources
from worker.kernels import lora_rows
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
    the pools' strides as worker/adapters/slots.py lays them out, ranks a [P, slots] view of [slots, layers, 5])."""
    br = triton.next_power_of_2(r_max)
    warps, out, rs, slots = TILE["num_warps"], {}, LAYERS * 5, SLOTS + 1
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
    partials = dict(y0_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i64", ranks_ptr="*i32",
                    part_ptr="*fp32", stride_bn=r_max, stride_rs=rs)  # fmt: skip
    for name, n, tiles, y0 in (("c_attn's term", QKV, norm_tiles, 0), ("mlp.c_proj's", HIDDEN, act_tiles, HIDDEN)):
        out[f"expand_rows_partials ({name}, {bn} columns)"] = _compile(
            lora_rows._expand_rows_partials_kernel,
            dict(partials, N=n, TILES=tiles, stride_y0=y0, stride_y=n, stride_bs=n * r_max, stride_pt=tiles * br),
            dict(R_MAX=r_max, BLOCK_R=br, BLOCK_T=triton.next_power_of_2(tiles), BLOCK_N=bn, HAS_Y0=True, PDL=False),
            arch, warps,
        )  # fmt: skip
    out[f"expand_rows (attn.c_proj, {bn} columns)"] = _compile(
        lora_rows._expand_rows_kernel,
        dict(out_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i64", ranks_ptr="*i32", N=HIDDEN,
             N_TILES=triton.cdiv(HIDDEN, bn), H_OFFSET=HIDDEN, stride_o=HIDDEN + slots * r_max, stride_y=HIDDEN,
             stride_bs=HIDDEN * r_max, stride_bp=HIDDEN * r_max, stride_bn=r_max, stride_rp=1, stride_rs=rs),
        dict(P=1, R_MAX=r_max, BLOCK_R=br, BLOCK_N=bn, PDL=False), arch, warps,
    )  # fmt: skip
    for lanes in (False, True):
        width = MLP + (slots * r_max if lanes else 0)  # the consumer's input row: its K lanes after the activation
        out[f"expand_rows_silu_mul (gate|up, {bn} columns{', K lanes' if lanes else ''})"] = _compile(
            lora_rows._expand_rows_act_kernel,
            dict(out_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i64", ranks_ptr="*i32", a2_ptr="*bf16",
                 part_ptr="*fp32", cnt_ptr="*i32", N=MLP, H_OFFSET=2 * MLP, SLOTS=slots,
                 stride_o=2 * MLP + slots * 2 * r_max, stride_y=width, stride_bs=2 * MLP * r_max,
                 stride_bp=MLP * r_max, stride_bn=r_max, stride_rp=1, stride_rs=rs, stride_a2s=r_max * width,
                 stride_a2r=width, stride_pt=act_tiles * br),
            dict(R_MAX=r_max, BLOCK_R=br, BLOCK_N=bn, LIBDEVICE=True, SHRINK=True, R2_MAX=r_max, BLOCK_R2=br,
                 LANES=lanes, BLOCK_T=triton.next_power_of_2(act_tiles), BLOCK_S=triton.next_power_of_2(slots),
                 PDL=False),
            arch, warps,
        )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="8,16,32,64", help="pool ranks (r_max) to compile for")
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    spills = 0
    for r in (int(x) for x in args.ranks.split(",")):
        for name, res in kernels(r, args.arch).items():
            bad = res["stack"] != 0
            spills += bad
            print(f"r_max {r:3d}  {name:60s} {res['regs']:3d} registers, {res['stack']:5d} B local"
                  + ("  SPILLS" if bad else ""))  # fmt: skip
    sys.exit(1 if spills else 0)


if __name__ == "__main__":
    main()
