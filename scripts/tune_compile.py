"""Compile the attention kernels' tuning variants for a GPU target without a GPU (Triton's bundled ptxas)
and report registers, local-memory spills and shared memory per variant: a CPU check that every config
scripts/tune_attention.py would time compiles, before GPU time is spent.

    python scripts/tune_compile.py                    # every decode variant and prefill tile, sm_90
    python scripts/tune_compile.py --defaults         # Tiles()'s decode and prefill kernels only
    python scripts/tune_compile.py --arch 100 --kv fp8

Not under TRITON_INTERPRET=1 (the interpreter replaces the kernels). Exit status 1 if a kernel fails to
compile or the defaults spill.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import bench_common  # noqa: F401  (puts the repository on sys.path)
from tune_decode import name, variants
from tune_prefill import configs, spec
from worker.kernels.paged_decode import _decode_split_kernel
from worker.kernels.paged_prefill import _prefill_kernel
from worker.kernels.triton_attention import Tiles

SMEM_MAX = 232448  # bytes of shared memory one program may use on sm_90 / sm_100
STRIDES16 = {
    "stride_qt",
    "stride_qh",
    "stride_cb",
    "stride_cr",
    "stride_ch",
    "stride_ot",
    "stride_oh",
    "stride_r",
    "stride_h",
    "stride_b",
}  # multiples of 16 at the 7B shape (32 heads x 128, blocks of 16)


def _resources(kernel: Any) -> dict[str, int]:
    """Registers and local memory (stack) from the cubin, shared memory from the metadata."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return dict(
        regs=int(regs.group(1)) if regs else -1, stack=int(stack.group(1)) if stack else -1, smem=kernel.metadata.shared
    )


def _compile(fn: Any, sig: dict[str, str], const: dict[str, Any], arch: int, warps: int, stages: int) -> dict:
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig) if sig[k].startswith("*") or k in STRIDES16}
    kernel = triton.compile(
        ASTSource(fn, sig, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=warps, num_stages=stages),
    )
    return _resources(kernel)


def decode(t: Tiles, kv: str, arch: int, direct: bool = False) -> dict[str, int]:
    """The split kernel of `t` over a bf16 or fp8 cache (bf16 queries), as paged_decode launches it."""
    cache, scaled = ("*fp8e4nv", True) if kv == "fp8" else ("*bf16", False)
    part = "*bf16" if direct else "*fp32"
    ints = [
        "num_splits",
        "stride_qt",
        "stride_qh",
        "stride_cb",
        "stride_cr",
        "stride_ch",
        "stride_tb",
        "stride_ot",
        "stride_oh",
    ]
    sig = dict(
        q_ptr="*bf16",
        kc_ptr=cache,
        vc_ptr=cache,
        tables_ptr="*i32",
        lens_ptr="*i32",
        out_ptr="*bf16",
        m_ptr=part,
        l_ptr=part,
        acc_ptr=part,
        counter_ptr="*i32" if t.decode_fused_reduce else "*bf16",
        k_scale_ptr="*fp32" if scaled else "*bf16",
        v_scale_ptr="*fp32" if scaled else "*bf16",
        scale_log2e="fp32",
        **dict.fromkeys(ints, "i32"),
    )
    const = dict(
        BLOCK_SIZE=16,
        HEAD_DIM=128,
        BLOCK_N=t.decode_n,
        STAGES=t.decode_stages,
        LANES=t.decode_lanes,
        PREFETCH=t.decode_prefetch,
        DIRECT=direct,
        SCALED=scaled,
        FUSED_REDUCE=t.decode_fused_reduce,
        BLOCK_S=16,
        PDL=False,  # DecodeKernels.pdl: the same code between the launch-control instructions
        NEWEST_APART=t.decode_newest_apart,
    )
    sig.update(dict.fromkeys(const, "constexpr"))
    return _compile(_decode_split_kernel, sig, const, arch, t.decode_warps, 3)


def prefill(t: Tiles, kv: str, paged: bool, arch: int) -> dict[str, int]:
    """The prefill kernel of `t` (bf16 queries) over the paged cache or the new tokens' k/v."""
    cache, scaled = ("*fp8e4nv", True) if kv == "fp8" else ("*bf16", False)
    ints = [
        "num_seqs",
        "stride_qt",
        "stride_qh",
        "stride_b",
        "stride_r",
        "stride_h",
        "stride_tb",
        "stride_ot",
        "stride_oh",
    ]
    sig = dict(
        q_ptr="*bf16",
        k_ptr=cache,
        v_ptr=cache,
        out_ptr="*bf16",
        tables_ptr="*i32",
        cu_q_ptr="*i32",
        cache_lens_ptr="*i32",
        tile_seq_ptr="*i32",
        tile_m_ptr="*i32",
        k_scale_ptr="*fp32" if scaled else "*bf16",
        v_scale_ptr="*fp32" if scaled else "*bf16",
        **dict.fromkeys(ints[:1], "i32"),
        scale_log2e="fp32",
        **dict.fromkeys(ints[1:], "i32"),
    )
    const = dict(
        PAGED=paged,
        BLOCK_SIZE=16 if paged else 1,
        HEAD_DIM=128,
        BLOCK_M=t.prefill_m,
        BLOCK_N=t.prefill_n,
        SCALED=scaled,
        PREFETCH=t.prefill_prefetch and paged,
    )
    sig.update(dict.fromkeys(const, "constexpr"))
    return _compile(_prefill_kernel, sig, const, arch, t.prefill_warps, t.prefill(torch.bfloat16, kv == "fp8")[3])


# A default may spill this many bytes of stack: the fp8-cache prefill's 128x128 tiles spill 24-40 B and still
# measured fastest on an H200 (29.8 ms for a 32,768-token prompt vs 39.1 ms for 64x64 tiles without spills).
SPILL_OK = 64


def report(label: str, run: Any) -> bool:
    """Print one line; False if it failed to compile or does not fit."""
    try:
        r = run()
    except Exception as exc:  # a compiler error is the finding
        print(f"  {label:58s} FAILED {type(exc).__name__}: {str(exc)[:160]}")
        return False
    flag = " SPILLS" if r["stack"] > SPILL_OK else " (a few bytes spilled)" if r["stack"] else ""
    flag += " OVER SHARED" if r["smem"] > SMEM_MAX else ""
    print(f"  {label:58s} regs {r['regs']:3d} stack {r['stack']:4d} B shared {r['smem'] / 1024:6.1f} KB{flag}")
    return r["smem"] <= SMEM_MAX and not (label.startswith("default") and r["stack"] > SPILL_OK)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--kv", default="bf16,fp8")
    ap.add_argument("--defaults", action="store_true", help="only Tiles()'s kernels")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("tune_compile.py compiles for the GPU: unset TRITON_INTERPRET")
    ok = True
    default = Tiles()
    for kv in args.kv.split(","):
        print(f"sm_{args.arch}, {kv} cache, Triton {triton.__version__}: decode")
        for t in [default] + ([] if args.defaults else variants(False)):
            label = ("default " if t == default else "") + name(t)
            ok &= report(label, lambda t=t, kv=kv: decode(t, kv, args.arch))
        print(f"sm_{args.arch}, {kv} cache: prefill (paged, and over k/v for bf16)")
        for t in [default] + ([] if args.defaults else configs(False)):
            for paged in (True, False) if kv == "bf16" else (True,):
                label = ("default " if t == default else "") + f"{'paged' if paged else 'k/v'} {spec(t)}"
                ok &= report(label, lambda t=t, kv=kv, paged=paged: prefill(t, kv, paged, args.arch))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
