"""Compile the multi-LoRA decode kernels' configs for an NVIDIA arch on a CPU (no GPU needed): the configs
scripts/gpu_check_lora.py times, so a GPU session does not find a compile error first.

    PYTHONPATH=. python scripts/gpu_check_lora_compile.py [--arch 90]   # exit 1 when any config fails
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worker.kernels import lora as two  # noqa: E402
from worker.kernels import lora_decode  # noqa: E402
from worker.kernels.lora_decode import LocalTiles  # noqa: E402


def compile_only(arch: int) -> None:
    """Compile the local kernel's configs and the two-launch expand tiles for sm_`arch` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn: Any, ptrs: list[str], ints: list[str], const: dict[str, int], warps: int) -> None:
        sig = {**dict.fromkeys(ptrs, "*bf16"), **dict.fromkeys(ints, "i32"), **dict.fromkeys(const, "constexpr")}
        for p in ("starts_ptr", "slots_ptr", "lens_ptr", "ranks_ptr"):
            if p in sig:
                sig[p] = "*i32" if p != "slots_ptr" else "*i64"
        if "h_ptr" in sig:
            sig["h_ptr"] = "*fp32"
        triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))

    local_ints = ["K", "N", "N_PER_PROG", "N_SPLIT", "stride_xt", "stride_as", "stride_ap", "stride_ar", "stride_bs",
                  "stride_bp", "stride_bn", "stride_yt", "stride_rp", "stride_rs"]  # fmt: skip
    local_ptrs = ["x_ptr", "a_ptr", "b_ptr", "y_ptr", "starts_ptr", "slots_ptr", "ranks_ptr"]
    expand_ints = ["N", "N_TILES", "stride_hs", "stride_ht", "stride_hp", "stride_bs", "stride_bp", "stride_bn",
                   "stride_yt", "stride_rp", "stride_rs"]  # fmt: skip
    expand_ptrs = ["h_ptr", "b_ptr", "y_ptr", "starts_ptr", "lens_ptr", "slots_ptr", "ranks_ptr"]
    shrink_ints = ["K", "K_PER_SPLIT", "stride_xt", "stride_as", "stride_ap", "stride_ar", "stride_hs", "stride_ht",
                   "stride_hp", "stride_rp", "stride_rs"]  # fmt: skip
    shrink_ptrs = ["x_ptr", "a_ptr", "h_ptr", "starts_ptr", "lens_ptr", "slots_ptr", "ranks_ptr"]
    ok = True
    for label, run in [
        *[(f"local r_max {r} {t}", partial(build, lora_decode._decode_lora_local_kernel, local_ptrs, local_ints,
           dict(BLOCK_R=max(16, r), BLOCK_K=max(16, t.block_k * 16 // max(16, r)),
                BLOCK_N=max(16, t.block_n * 16 // max(16, r))), t.num_warps))
          for r in (16, 64) for t in (LocalTiles(), LocalTiles(1, 1024, 1024, 16), LocalTiles(1, 256, 128, 4))],
        *[(f"two: expand decode BLOCK_N {bn} SPLIT_K {s} STORE {st}", partial(build, two._expand_kernel, expand_ptrs,
           expand_ints, dict(SPLIT_K=s, BLOCK_M=1, BLOCK_N=bn, BLOCK_R=16, STORE=st), 4))
          for bn in (256, 512) for s in (4, 8, 16, 32) for st in (False, True)],
        *[(f"two: shrink decode BLOCK_K {bk} SPLIT_K {s}", partial(build, two._shrink_kernel, shrink_ptrs, shrink_ints,
           dict(SPLIT_K=s, BLOCK_M=1, BLOCK_R=16, BLOCK_K=bk), 4)) for bk in (128, 256, 512) for s in (4, 8, 16, 32)],
    ]:  # fmt: skip
        try:
            run()
            print(f"  compiled  sm_{arch}  {label}")
        except Exception as exc:
            ok = False
            print(f"  FAILED    sm_{arch}  {label}: {type(exc).__name__}: {str(exc)[:300]}")
    sys.exit(0 if ok else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    compile_only(ap.parse_args().arch)


if __name__ == "__main__":
    main()
