"""One GPU session's check of the decode GEMVs (worker/kernels/gemv.py), bf16 activations:

    PYTHONPATH=. python scripts/gpu_check_gemv.py            # on the H200: correctness, then timings (< 150 s)
    PYTHONPATH=. python scripts/gpu_check_gemv.py --compile  # on a CPU: compile every variant for sm_90

1. PASS/FAIL of the GPTQ GEMV (Int4/Int8, M 1/3/8/16, act order, asym zeros, a row shard starting inside
   a tile, groups 128/none), the FP8 candidates and the bf16 GEMV (every tile variant) against fp32
   references (max errors printed).
2. Timings, weights never in L2 (each timed CUDA graph cycles over copies of the weight totalling >=
   256 MB): per shape and M, the old split-K GPTQ kernel (baseline), the new GEMV's default and its tile
   variants, bf16 cuBLAS; the bf16 GEMV's tiles vs cuBLAS (7B shapes, M 1 and 8); FP8 Triton W8A16 vs
   torch._scaled_mm. Prints GB/s of the bytes each must read
   and the ratio to the baseline. Always exits 0; a failing candidate prints why.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from bench_common import cuda_time  # noqa: E402
from worker.kernels.gemv import (  # noqa: E402
    DENSE,
    NO_GROUPS,
    GemvTiles,
    _gemv_kernel,
    default_tiles,
    gemv_weights,
    quant_gemv,  # noqa: E402
)
from worker.kernels.gptq_reference import gptq_matmul_reference, group_order  # noqa: E402
from worker.quant.gptq_format import quantize_rtn  # noqa: E402

START = time.time()
SHAPES = {  # (K, N) at TP 1
    "7b c_attn": (4096, 12288),
    "7b attn.c_proj": (4096, 4096),
    "7b w2|w1": (4096, 22016),
    "7b mlp.c_proj": (11008, 4096),
    "14b w2|w1": (5120, 27392),
    "14b mlp.c_proj": (13696, 5120),
    "72b w2|w1": (8192, 49152),
    "72b mlp.c_proj": (24576, 8192),
}
VARIANTS = [  # M = 1 candidates (block_k follows the bits); programs_per_sm is a runtime choice
    GemvTiles(block_n=64, num_warps=4),
    GemvTiles(block_n=128, num_warps=4, prefetch=False),
    GemvTiles(block_n=128, num_warps=8),
    GemvTiles(block_n=256, num_warps=8),
    GemvTiles(block_n=256, num_warps=8, prefetch=False),
    GemvTiles(block_n=128, num_warps=4, programs_per_sm=2),
    GemvTiles(block_n=128, num_warps=4, programs_per_sm=8),
    GemvTiles(block_n=256, num_warps=8, programs_per_sm=8),
]
DENSE_VARIANTS = [
    GemvTiles(block_n=16, block_k=512, num_warps=4),
    GemvTiles(block_n=32, block_k=256, num_warps=4, prefetch=False),
    GemvTiles(block_n=64, block_k=128, num_warps=4),
    GemvTiles(block_n=64, block_k=256, num_warps=8),
    GemvTiles(block_n=32, block_k=256, num_warps=4, programs_per_sm=8),
]


def _tiles(bits: int, t: GemvTiles) -> GemvTiles:
    return GemvTiles(t.block_n, default_tiles(bits).block_k, t.num_warps, t.num_stages, t.programs_per_sm, t.prefetch)


def report(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> bool:
    err = (out.float() - ref.float()).abs().max().item()
    rel = err / max(ref.float().abs().max().item(), 1e-30)
    ok = bool(torch.isfinite(out).all()) and rel <= tol
    print(f"{'PASS' if ok else 'FAIL'} {name:58s} max abs err {err:.3e} rel {rel:.2e}", flush=True)
    return ok


def check(name: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:  # a failing candidate is a finding, not the end of the run
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def gptq_case(m: int, n: int, k: int, bits: int, gs: int, act: bool, sym: bool, lo: int = 0) -> bool:
    """The GEMV on rows [lo, k) of a random RTN-quantized linear, against the fp32 reference."""
    g = torch.Generator().manual_seed(m * 7 + bits)
    w = torch.randn(n, k, generator=g) / k**0.5
    q = quantize_rtn(w, bits, gs, sym=sym, perm=torch.randperm(k, generator=g) if act else None)
    p = 32 // bits
    qw, g_idx = q.qweight[lo // p :].cuda(), q.g_idx[lo:].cuda()
    qz, sc = q.qzeros.cuda(), q.scales.to(torch.bfloat16).cuda()
    x = torch.randn(m, k - lo, generator=g).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    ref = gptq_matmul_reference(x.float(), qw, qz, sc.float(), g_idx, bits, 1, bias.float())
    qw_sorted, perm = group_order(qw, g_idx, bits)
    gw = gemv_weights(qw_sorted, qz, sc, bits, 1, gs, lo)
    xp = x if perm is None else x[:, perm]
    ok = True
    for split in (None, 1, 3):
        out = quant_gemv(xp, gw, bias, split_k=split)
        ok &= report(f"gptq int{bits} M={m} N={n} K={k} gs={gs} act={act} sym={sym} lo={lo} split={split}", out, ref)
        ok &= bool(int(gw.counters.abs().sum()) == 0)
    return ok


def correctness() -> None:
    print("== correctness (bf16 activations vs fp32 reference; rel = max err / max |ref|, PASS <= 1e-2)")
    for bits in (4, 8):
        for m, n, k, gs, act, sym, lo in (
            (1, 200, 1000, 128, False, False, 0),
            (3, 264, 1024, 128, True, False, 0),
            (8, 4096, 4096, 128, False, True, 0),
            (16, 136, 896, -1, False, True, 0),
            (1, 520, 1408, 128, False, False, 320),
            (8, 520, 1408, 128, False, False, 320),
        ):
            check(f"gptq int{bits} M={m}", partial(gptq_case, m, n, k, bits, gs, act, sym, lo))
    check("fp8", fp8_correctness)
    for m, n, k in ((1, 1000, 1000), (3, 4096, 4096), (8, 12288, 4096), (1, 4096, 11008)):
        check(f"dense M={m}", partial(dense_case, m, n, k))


def dense_case(m: int, n: int, k: int) -> bool:
    from worker.kernels.gemv import counters_for, dense_gemv

    x, w, b = (torch.randn(*s, device="cuda").to(torch.bfloat16) for s in ((m, k), (n, k), (n,)))
    ref = torch.nn.functional.linear(x.float(), w.float(), b.float())
    counters, ok = counters_for(n, x.device), True
    for t in [DENSE] + DENSE_VARIANTS:
        ok &= report(f"dense M={m} N={n} K={k} {_name(t)}", dense_gemv(x, w, b, counters, tiles=t), ref)
    return ok and int(counters.abs().sum()) == 0


def _name(t: GemvTiles) -> str:
    return f"n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages} pps{t.programs_per_sm} pf{int(t.prefetch)}"


def fp8_correctness() -> bool:
    from worker.kernels.fp8_matmul import w8a16_matmul, w8a16_reference
    from worker.quant.fp8 import fp8_matmul_scaled_mm, quantize_rows

    ok = True
    for m in (1, 8):
        g = torch.Generator(device="cuda").manual_seed(m)
        wq, ws = quantize_rows(torch.randn(4096, 4096, device="cuda", generator=g))
        x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
        ref = w8a16_reference(x.float(), wq, ws[:, 0])
        ok &= report(f"fp8 triton w8a16 M={m}", w8a16_matmul(x, wq, ws[:, 0]), ref)
        ok &= report(f"fp8 torch._scaled_mm M={m}", fp8_matmul_scaled_mm(x, wq, ws[:, 0]), ref, 3e-2)
    return ok


def graph_time(calls: list[Callable[[], object]], reps: int = 10) -> float:
    """Median µs per call of a CUDA graph that makes every call once (warmed up first)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return cuda_time(graph.replay, iters=reps, warmup=1) * 1e6 / len(calls)


def copies(nbytes: int) -> int:
    return max(2, min(64, -(-(256 << 20) // max(nbytes, 1))))


def time_shape(label: str, k: int, n: int, bits: int, m: int, sweep: bool) -> None:
    from worker.kernels.gptq import gptq_gemv

    p, groups = 32 // bits, k // 128
    words = [torch.randint(-(2**31), 2**31 - 1, (k // p, n), dtype=torch.int32, device="cuda")]
    c = copies(words[0].numel() * 4)
    words += [torch.randint_like(words[0], -(2**31), 2**31 - 1) for _ in range(c - 1)]
    scales = torch.rand(groups, n, device="cuda").to(torch.bfloat16) * 1e-3
    qzeros = torch.full((groups, n // p), 0x77777777 if bits == 4 else 0x7F7F7F7F, dtype=torch.int32, device="cuda")
    g_idx = (torch.arange(k, device="cuda") // 128).to(torch.int32)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    nbytes = words[0].numel() * 4 + scales.numel() * 2 + x.numel() * 2 + m * n * 2
    base_us = graph_time([partial(gptq_gemv, x, w, qzeros, scales, g_idx, bits, group_size=128) for w in words])
    rows = [("old split-K kernel (baseline)", base_us)]
    gws = [gemv_weights(w, qzeros, scales, bits, 1, 128, 0) for w in words]
    ref = gptq_matmul_reference(x.float(), words[0], qzeros, scales.float(), g_idx, bits)
    for t in [default_tiles(bits)] + ([_tiles(bits, v) for v in VARIANTS] if sweep else []):
        name = (
            f"gemv n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages} pps{t.programs_per_sm} pf{int(t.prefetch)}"
        )
        try:
            if report(f"  {label} int{bits} M={m} {name}", quant_gemv(x, gws[0], tiles=t), ref):
                rows.append((name, graph_time([partial(quant_gemv, x, gw, tiles=t) for gw in gws])))
        except Exception as exc:
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:200]}")
    del words, gws
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies(n * k * 2))]
    rows.append(("bf16 cuBLAS F.linear", graph_time([partial(torch.nn.functional.linear, x, w) for w in w16])))
    del w16
    print(f"-- {label} K={k} N={n} int{bits} M={m}: {nbytes / 1e6:.1f} MB quantized")
    for name, us in rows:
        gbs = nbytes / us / 1e3 if not name.startswith("bf16") else (n * k * 2 + x.numel() * 2) / us / 1e3
        print(f"   {name:52s} {us:8.1f} us {gbs:7.0f} GB/s  x{base_us / us:5.2f} vs baseline")


def time_fp8(label: str, k: int, n: int, m: int) -> None:
    from worker.kernels.fp8_matmul import w8a16_matmul
    from worker.quant.fp8 import fp8_matmul_scaled_mm

    ws = torch.rand(n, device="cuda") * 1e-3
    wqs = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies(n * k))]
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    tri = graph_time([partial(w8a16_matmul, x, w, ws) for w in wqs])
    smm = graph_time([partial(fp8_matmul_scaled_mm, x, w, ws) for w in wqs])
    best = "triton" if tri < smm else "_scaled_mm"
    print(f"-- fp8 {label} M={m}: triton {tri:.1f} us ({n * k / tri / 1e3:.0f} GB/s), _scaled_mm {smm:.1f} us"
          f" ({n * k / smm / 1e3:.0f} GB/s) -> {best}")  # fmt: skip


def time_dense(label: str, k: int, n: int, m: int) -> None:
    """bf16 at M <= 8: cuBLAS (the baseline here) against the Triton GEMV's tiles."""
    from worker.kernels.gemv import counters_for, dense_gemv

    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies(n * k * 2))]
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    base = graph_time([partial(torch.nn.functional.linear, x, w) for w in ws])
    print(f"-- bf16 {label} K={k} N={n} M={m}: cuBLAS {base:.1f} us {n * k * 2 / base / 1e3:.0f} GB/s")
    for t in [DENSE] + DENSE_VARIANTS:
        cs = [counters_for(n, x.device) for _ in ws]
        us = graph_time([partial(dense_gemv, x, w, None, c, t) for w, c in zip(ws, cs)])
        print(f"   dense {_name(t):44s} {us:8.1f} us {n * k * 2 / us / 1e3:7.0f} GB/s  x{base / us:5.2f} vs cuBLAS")


def _due(limit: float, what: str) -> bool:
    if time.time() - START < limit:
        return True
    print(f"skipped {what}: time budget")
    return False


def timings() -> None:
    print("== timings (CUDA graphs over weight copies > L2; GB/s of the bytes each call must read)")
    for label, (k, n) in SHAPES.items():
        seven = label.startswith("7b")
        for bits, m, sweep in ((4, 1, seven), (8, 1, seven), (4, 8, False)) if seven else ((4, 1, False),):
            if _due(90, f"{label} int{bits} M={m}"):
                check(f"timing {label} int{bits} M={m}", partial(time_shape, label, k, n, bits, m, sweep))
    for label, (k, n) in list(SHAPES.items())[:4]:
        for m in (1, 8):
            if _due(120, f"bf16 {label} M={m}"):
                check(f"bf16 timing {label}", partial(time_dense, label, k, n, m))
    for label, (k, n) in list(SHAPES.items())[:4]:
        for m in (1, 8):
            if _due(135, f"fp8 {label} M={m}"):
                check(f"fp8 timing {label}", partial(time_fp8, label, k, n, m))


def _compile(fn: Any, label: str, ptrs: dict[str, str], ints: tuple[str, ...], const: dict, t: GemvTiles) -> None:
    """Compile one variant for sm_90 with Triton's bundled ptxas and print ok/FAILED."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**{f"{p}_ptr": ty for p, ty in ptrs.items()}, **dict.fromkeys(ints, "i32")}
    sig.update(dict.fromkeys(const, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(sig) if a.endswith("_ptr") or a == "N"}
    try:
        opts = dict(num_warps=t.num_warps, num_stages=t.num_stages)
        kern = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
        print(f"ok     {label}: {kern.metadata.shared} B shared")
    except Exception as exc:  # a compiler error is the finding
        print(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:300]}")


def compile_all() -> None:
    """Every GPTQ and float GEMV variant, as launched (bf16 activations), for sm_90 (no GPU; not interpreted)."""
    from worker.kernels.gemv import _dense_kernel

    bf16 = "*bf16"
    ptrs = dict(x=bf16, qw="*i32", s=bf16, z=bf16, b=bf16, y=bf16, part="*fp32", cnt="*i32")
    ints = ("M", "N", "K", "K_PER_SPLIT", "K_OFFSET", "SPLITS", "stride_xm", "stride_ym")
    for bits in (4, 8):
        for t in [default_tiles(bits)] + [_tiles(bits, v) for v in VARIANTS]:
            for bm, zero, gs in ((1, 1 << (bits - 1), 128), (16, -1, 128), (1, -1, NO_GROUPS)):
                const = dict(BITS=bits, ZERO=zero, GROUP_SIZE=gs, HAS_BIAS=True, REDUCE=True,
                             PREFETCH=t.prefetch and bm == 1, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=t.block_n,
                             BLOCK_K=t.block_k)  # fmt: skip
                _compile(_gemv_kernel, f"int{bits} M{bm} zero{zero} gs{gs} {_name(t)}", ptrs, ints, const, t)
    ptrs = dict(x=bf16, w=bf16, b=bf16, y=bf16, part="*fp32", cnt="*i32")
    ints = ("M", "N", "K", "K_PER_SPLIT", "SPLITS", "stride_xm", "stride_wn", "stride_ym")
    for t in [DENSE] + DENSE_VARIANTS:
        for bm in (1, 16):
            const = dict(HAS_BIAS=True, REDUCE=True, PREFETCH=t.prefetch and bm == 1, DOT_PRECISION="tf32",
                         BLOCK_M=bm, BLOCK_N=t.block_n, BLOCK_K=t.block_k)  # fmt: skip
            _compile(_dense_kernel, f"dense M{bm} {_name(t)}", ptrs, ints, const, t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true", help="CPU: compile the variants for sm_90 only")
    args = ap.parse_args()
    if args.compile:
        compile_all()
        return
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked (use --compile on a CPU)")
        return
    watchdog = threading.Timer(148, lambda: (print("TIMEOUT at 148 s: stopped", flush=True), os._exit(0)))
    watchdog.daemon = True
    watchdog.start()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    check("correctness", correctness)
    timings()
    print(f"done in {time.time() - START:.0f} s", flush=True)
    os._exit(0)  # the watchdog thread must not keep the process alive


if __name__ == "__main__":
    main()
