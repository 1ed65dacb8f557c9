"""Compile the "gemm" decode mode's LoRA kernels (worker/kernels/lora_rows.py, lora_norm.py) for a GPU target without a
GPU (Triton's bundled ptxas) at each pool rank, with the tiles their launchers pick (lora_rows.TILE scaled by
lora_rows.tile_columns), at the 7B shapes; report registers and local-memory spills. Exit status 1 if any spills:
a tile's registers hold [columns, lanes] of B or A, and serve's default --max-lora-rank 64 made the unscaled tiles
spill (issue 17, P2).

    python scripts/lora_compile.py                       # r_max 8, 16, 32, 64 at sm_90
    python scripts/lora_compile.py --ranks 64 --arch 100

Not under TRITON_INTERPRET=1 (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import triton

import bench_common  # noqa: F401  (puts the repository on sys.path)
from tune_compile import _compile
from worker.kernels import lora_rows
from worker.kernels.lora_norm import _norm_shrink_kernel
from worker.kernels.lora_rows import TILE, tile_columns

HIDDEN, QKV, MLP = 4096, 3 * 4096, 11008  # the 7B shape: c_attn's input and output, the MLP's width
SLOTS = 32


def _i32(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "i32")


def _run(fn: Any, ptrs: dict[str, str], ints: tuple[str, ...], const: dict[str, Any], arch: int, warps: int) -> dict:
    sig = {**ptrs, **_i32(*ints), **dict.fromkeys(const, "constexpr")}
    return _compile(fn, sig, const, arch, warps, 3)


def kernels(r_max: int, arch: int) -> dict[str, dict[str, int]]:
    """name -> resources of each kernel as its launcher would launch it over pools of r_max lanes."""
    br = triton.next_power_of_2(r_max)
    warps, out = TILE["num_warps"], {}
    norm_bn = tile_columns(TILE["norm_block_n"] or TILE["block_n"], br)
    out[f"rms_norm_shrink (c_attn's h, {norm_bn} columns)"] = _run(
        _norm_shrink_kernel,
        dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", sum_ptr="*bf16", a_ptr="*bf16",
             slots_ptr="*i32", part_ptr="*fp32", eps="fp32", inv_n="fp32"),
        ("n_cols", "stride_x", "stride_res", "stride_out", "stride_sum", "stride_as", "stride_ar", "stride_pt"),
        dict(HAS_RESIDUAL=True, BLOCK=HIDDEN, BLOCK_N=norm_bn, R_MAX=r_max, BLOCK_R=br, PDL=False),
        arch, min(max(HIDDEN // 512, 1), 16),
    )  # fmt: skip
    bn = tile_columns(TILE["block_n"], br)
    partials = dict(y0_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i32", ranks_ptr="*i32", part_ptr="*fp32")
    partial_ints = ("N", "TILES", "stride_y0", "stride_y", "stride_bs", "stride_bn", "stride_rs", "stride_pt")
    for name, tiles in (("c_attn's term", triton.cdiv(HIDDEN, norm_bn)), ("mlp.c_proj's", triton.cdiv(MLP, bn))):
        out[f"expand_rows_partials ({name}, {bn} columns)"] = _run(
            lora_rows._expand_rows_partials_kernel, partials, partial_ints,
            dict(R_MAX=r_max, BLOCK_R=br, BLOCK_T=triton.next_power_of_2(tiles), BLOCK_N=bn, HAS_Y0=True, PDL=False),
            arch, warps,
        )  # fmt: skip
    out[f"expand_rows (attn.c_proj, {bn} columns)"] = _run(
        lora_rows._expand_rows_kernel,
        dict(out_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i32", ranks_ptr="*i32"),
        ("N", "N_TILES", "H_OFFSET", "stride_o", "stride_y", "stride_bs", "stride_bp", "stride_bn", "stride_rp",
         "stride_rs"),
        dict(P=1, R_MAX=r_max, BLOCK_R=br, BLOCK_N=bn, PDL=False), arch, warps,
    )  # fmt: skip
    act_bn = tile_columns(TILE["block_n"], br)  # gate|up's pool and mlp.c_proj's: the same r_max
    for lanes in (False, True):
        out[f"expand_rows_silu_mul (gate|up, {act_bn} columns{', K lanes' if lanes else ''})"] = _run(
            lora_rows._expand_rows_act_kernel,
            dict(out_ptr="*bf16", y_ptr="*bf16", b_ptr="*bf16", slots_ptr="*i32", ranks_ptr="*i32", a2_ptr="*bf16",
                 part_ptr="*fp32", cnt_ptr="*i32"),
            ("N", "H_OFFSET", "SLOTS", "stride_o", "stride_y", "stride_bs", "stride_bp", "stride_bn", "stride_rp",
             "stride_rs", "stride_a2s", "stride_a2r", "stride_pt"),
            dict(R_MAX=r_max, BLOCK_R=br, BLOCK_N=act_bn, LIBDEVICE=True, SHRINK=True, R2_MAX=r_max, BLOCK_R2=br,
                 LANES=lanes, BLOCK_T=triton.next_power_of_2(triton.cdiv(MLP, act_bn)),
                 BLOCK_S=triton.next_power_of_2(SLOTS), PDL=False),
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
