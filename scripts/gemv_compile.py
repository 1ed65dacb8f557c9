"""Compile every decode-GEMV variant that scripts/gpu_check_gemv.py launches for sm_90 on a CPU (no GPU, not
interpreted): `python scripts/gpu_check_gemv.py --compile`. Prints ok/FAILED, shared memory, and registers
and spills per thread (cuobjdump on the cubin, where Triton bundles it): a variant that spills or needs more
than 128 registers per thread at 4 warps runs fewer programs per SM than its split-K plan assumes. The M = 1
GPTQ variants also print their main loop's SASS instructions per weight value (cuobjdump -sass).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any

import triton

from worker.kernels.fp8_matmul import FP8_GEMV_TILES
from worker.kernels.gemv import NO_GROUPS, _gemv_kernel
from worker.kernels.gemv_dense import DENSE, DENSE_GEMV_PLAN, _dense_kernel
from worker.kernels.gemv_tiles import GEMV_TILES, GemvTiles


def _usage(cubin: bytes) -> str:
    """'R regs, S B spill' of the kernel in a cubin, or '' where cuobjdump is missing."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spill = re.search(r"STACK:(\d+)", out)
    return f"{regs.group(1) if regs else '?'} regs, {spill.group(1) if spill else '?'} B stack"


def _loop_instructions(cubin: bytes) -> int:
    """SASS instructions in the kernel's largest backward-branch loop (0 where cuobjdump is missing)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    addrs = [int(a, 16) for a in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+\S", sass, re.M)]
    loops = [
        (int(m.group(2), 16), int(m.group(1), 16))
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/[^;\n]*BRA 0x([0-9a-f]+)", sass)
    ]
    return max((sum(lo <= a <= hi for a in addrs) for lo, hi in loops if lo < hi), default=0)


def _compile(fn: Any, label: str, ptrs: dict[str, str], ints: tuple[str, ...], const: dict, t: Any) -> Any:
    """Compile one variant for sm_90 with Triton's bundled ptxas and print ok/FAILED; the kernel or None."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**{f"{p}_ptr": ty for p, ty in ptrs.items()}, **dict.fromkeys(ints, "i32")}
    sig.update(dict.fromkeys(const, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(sig) if a.endswith("_ptr") or a == "N"}
    try:
        opts = dict(num_warps=t.num_warps, num_stages=t.num_stages)
        kern = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
        print(f"ok     {label}: {kern.metadata.shared} B shared, {_usage(kern.asm['cubin'])}", flush=True)
        return kern
    except Exception as exc:  # a compiler error is the finding
        print(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return None


def _name(t: GemvTiles) -> str:
    return f"n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages} pf{int(t.prefetch)}"


def compile_all() -> None:
    """GPTQ GEMV: every named tile set at M = 1 (sym and asym zeros; split-K on and off), M = 16 with the
    default's; the dense GEMV: bf16 plan tiles and e4m3 tiles at M = 1 and 16."""
    bf16 = "*bf16"
    ptrs = dict(x=bf16, qw="*i32", s=bf16, z=bf16, b=bf16, y=bf16, part="*fp32", cnt="*i32")
    ints: tuple[str, ...] = ("M", "N", "K", "K_PER_SPLIT", "K_OFFSET", "MASK_T", "SPLITS", "stride_xm", "stride_ym")
    for bits in (4, 8):
        p = 32 // bits
        for name, by_bits in GEMV_TILES.items():
            t = by_bits[bits]
            cases = [(1, 1 << (bits - 1), 128, t.programs_per_sm > 0), (1, -1, 128, True)]
            cases += [(16, -1, 128, True), (1, -1, NO_GROUPS, True)] if name == "g1" else []
            for bm, zero, gs, reduce in cases:
                bm = 16 if t.dot else bm
                bk = t.block_k if bm == 1 else 16 * p
                shift = t.unpack == "shift" and (bm == 1 or bits == 4)
                const = dict(BITS=bits, ZERO=zero, GROUP_SIZE=gs, HAS_BIAS=True, REDUCE=reduce,
                             PREFETCH=t.prefetch and bm == 1, STAGES=1 if t.prefetch and bm == 1 else t.num_stages,
                             SHIFT=shift, X_PAIRS=bm == 1 and t.unpack == "shift",
                             ZBIAS=(16 if bits == 4 else 256) * shift, PDL=False,
                             DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=t.block_n, BLOCK_K=bk,
                             TILE_GROUPS=max(1, bk // gs))  # fmt: skip
                label = f"int{bits} {name:8s} BM{bm} zero{zero} gs{gs} reduce{int(reduce)} {_name(t)} {t.unpack}"
                x_ty = "*i32" if const["X_PAIRS"] else bf16
                kern = _compile(_gemv_kernel, label, {**ptrs, "x": x_ty}, ints, const, t)
                if kern is not None and bm == 1:  # one thread's values an iteration
                    per_value = _loop_instructions(kern.asm["cubin"]) / (bk * t.block_n / (32 * t.num_warps))
                    print(f"       loop: {per_value:.2f} instructions a value", flush=True)
    ints = ("M", "N", "K", "K_PER_SPLIT", "SPLITS", "stride_xm", "stride_wn", "stride_ym")
    dense = {"bf16 " + _name(t): (bf16, t) for plan in DENSE_GEMV_PLAN.values() for _, t in plan}
    dense["bf16 " + _name(DENSE)] = (bf16, DENSE)
    dense.update({f"fp8 {nm}": ("*fp8e4nv", t) for nm, t in FP8_GEMV_TILES.items() if t is not None})
    for label, (wty, t) in dense.items():
        ptrs = dict(x=bf16, w=wty, s="*fp32" if wty != bf16 else bf16, b=bf16, y=bf16, part="*fp32", cnt="*i32")
        for bm in (1, 16):
            const = dict(HAS_SCALE=wty != bf16, HAS_BIAS=True, REDUCE=True, PREFETCH=t.prefetch and bm == 1,
                         STAGES=1 if t.prefetch and bm == 1 else t.num_stages,
                         ACT=False, LIBDEVICE=True, PDL=False,
                         DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=t.block_n, BLOCK_K=t.block_k)  # fmt: skip
            _compile(_dense_kernel, f"dense {label} M{bm}", ptrs, ints, const, t)
