"""One GPU session's check of the decode GEMVs (worker/kernels/gemv.py, gemv_dense.py, fp8_matmul.py), bf16:

    PYTHONPATH=. python scripts/gpu_check_gemv.py            # on the H200: < 120 s, SUMMARY block printed last
    PYTHONPATH=. python scripts/gpu_check_gemv.py --compile  # on a CPU: compile every variant for sm_90

1. PASS/FAIL of the GPTQ GEMV's edge cases (Int4/Int8, M 1/3/8, act order, asym zeros, a row shard starting
   inside a tile, tiles of one and of several groups) against fp32 references.
2. Timings, weights never in L2 (each timed CUDA graph cycles over copies of the weight totalling >= 256 MB),
   each candidate first checked against the reference on the same weights: the 7B shapes first (Int4, Int8
   and FP8 at M = 1 with every named tile set, then M = 8), the bf16 GEMV's chosen (shape, M) against cuBLAS,
   then the 14B/72B Int4/Int8 M = 1 shapes. GB/s counts the bytes each call must read.
3. SUMMARY: one line per shape, kind and M: the fastest passing candidate, its µs and GB/s, its speed-up over
   bf16 cuBLAS on the same shape, the default's µs, PASS/FAIL counts. Printed at the end or at the 115 s
   watchdog, whichever first. Always exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from bench_common import cuda_time  # noqa: E402
from worker.kernels.fp8_matmul import FP8_GEMV_DEFAULT, FP8_GEMV_TILES, w8a16_gemv, w8a16_reference  # noqa: E402
from worker.kernels.gemv import counters_for, gemv_weights, quant_gemv
from worker.kernels.gemv_dense import DENSE, DENSE_GEMV_PLAN, dense_gemv, dense_tiles  # noqa: E402
from worker.kernels.gemv_tiles import GEMV_DEFAULT, GEMV_TILES  # noqa: E402
from worker.kernels.gptq_reference import gptq_matmul_reference, group_order  # noqa: E402
from worker.quant.gptq_format import quantize_rtn  # noqa: E402

START = time.time()
BUDGET_S = 105  # no new section after this; the watchdog prints the summary at 115 s
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


@dataclass
class Line:
    label: str
    kind: str
    m: int
    times: dict[str, float] = field(default_factory=dict)  # candidate -> µs (passing ones)
    nbytes: int = 0
    bf16_us: float = 0.0
    default: str = ""
    failed: int = 0

    def text(self) -> str:
        head = f"{self.label:15s} {self.kind:5s} M={self.m}"
        if not self.times:
            return f"{head}  no passing candidate ({self.failed} FAIL)"
        best = min(self.times, key=self.times.__getitem__)
        us = self.times[best]
        vs = f"x{self.bf16_us / us:4.2f} vs bf16 {self.bf16_us:6.1f}" if self.bf16_us else "bf16 n/a"
        dflt = f"default {self.default} {self.times[self.default]:6.1f}" if self.default in self.times else ""
        ok = f"PASS {len(self.times)}" + (f" FAIL {self.failed}" if self.failed else "")
        return f"{head}  best {best:11s} {us:6.1f} us {self.nbytes / us / 1e3:5.0f} GB/s  {vs}  {dflt}  {ok}"


LINES: list[Line] = []
BF16_US: dict[tuple[int, int, int], float] = {}


def summary() -> None:
    print(f"== SUMMARY ({time.time() - START:.0f} s; bf16 = cuBLAS F.linear on the same shape, us per call)")
    for line in LINES:
        print(line.text())
    print(f"defaults: gptq {GEMV_DEFAULT}, fp8 {FP8_GEMV_DEFAULT}", flush=True)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> tuple[bool, float]:
    err = (out.float() - ref.float()).abs().max().item()
    rel = err / max(ref.float().abs().max().item(), 1e-30)
    return bool(torch.isfinite(out).all()) and rel <= tol, rel


def check(name: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:  # a failing candidate is a finding, not the end of the run
        print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def graph_time(calls: list[Callable[[], object]], reps: int = 5) -> float:
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


def bf16_us(k: int, n: int, m: int, x: torch.Tensor) -> float:
    """cuBLAS F.linear on bf16 weights of the shape (cached per shape and M)."""
    if (k, n, m) not in BF16_US:
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies(n * k * 2))]
        BF16_US[k, n, m] = graph_time([partial(torch.nn.functional.linear, x, w) for w in ws])
    return BF16_US[k, n, m]


def run_candidates(line: Line, cands: dict[str, Callable[[Any], object]], ref: torch.Tensor, ws: list) -> None:
    """Each candidate fn(w): checked on ws[0] against ref, then timed over all of ws (one line each)."""
    for name, fn in cands.items():
        try:
            out = fn(ws[0])
            assert isinstance(out, torch.Tensor)
            ok, rel = close(out, ref)
            if not ok:
                line.failed += 1
                print(f"   FAIL {line.label} {line.kind} M={line.m} {name}: rel err {rel:.2e}", flush=True)
                continue
            line.times[name] = graph_time([partial(fn, w) for w in ws])
            us = line.times[name]
            print(f"   {line.label} {line.kind} M={line.m} {name:11s} {us:7.1f} us {line.nbytes / us / 1e3:5.0f} GB/s",
                  flush=True)  # fmt: skip
        except Exception as exc:
            line.failed += 1
            print(f"   FAIL {line.label} {line.kind} M={line.m} {name}: {type(exc).__name__}: {str(exc)[:200]}")


def time_gptq(label: str, k: int, n: int, bits: int, m: int, names: list[str]) -> None:
    p, groups = 32 // bits, k // 128
    words = [torch.randint(-(2**31), 2**31 - 1, (k // p, n), dtype=torch.int32, device="cuda")]
    words += [torch.randint_like(words[0], -(2**31), 2**31 - 1) for _ in range(copies(words[0].numel() * 4) - 1)]
    scales = torch.rand(groups, n, device="cuda").to(torch.bfloat16) * 1e-3
    qzeros = torch.full((groups, n // p), 0x77777777 if bits == 4 else 0x7F7F7F7F, dtype=torch.int32, device="cuda")
    g_idx = (torch.arange(k, device="cuda") // 128).to(torch.int32)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    line = Line(label, f"int{bits}", m, default=GEMV_DEFAULT)
    line.nbytes = words[0].numel() * 4 + scales.numel() * 2 + x.numel() * 2 + m * n * 2
    LINES.append(line)
    gws = [gemv_weights(w, qzeros, scales, bits, 1, 128, 0) for w in words]
    ref = gptq_matmul_reference(x.float(), words[0], qzeros, scales.float(), g_idx, bits)
    cands: dict[str, Callable[[Any], object]] = {
        nm: partial(lambda t, gw: quant_gemv(x, gw, tiles=t), GEMV_TILES[nm][bits]) for nm in names
    }
    run_candidates(line, cands, ref, gws)
    del words, gws
    line.bf16_us = bf16_us(k, n, m, x)


def time_fp8(label: str, k: int, n: int, m: int, names: list[str]) -> None:
    from worker.quant.fp8 import fp8_matmul_scaled_mm

    ws = torch.rand(n, device="cuda") * 1e-3
    wqs = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies(n * k))]
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    line = Line(label, "fp8", m, default=FP8_GEMV_DEFAULT, nbytes=n * k + n * 4 + x.numel() * 2 + m * n * 2)
    LINES.append(line)
    counters = counters_for(n, x.device)

    def gemv(nm: str, w: torch.Tensor) -> torch.Tensor:
        return w8a16_gemv(x, w, ws, None, counters, nm)

    cands: dict[str, Callable[[Any], object]] = {nm: partial(gemv, nm) for nm in names}
    cands["_scaled_mm"] = lambda w: fp8_matmul_scaled_mm(x, w, ws, None)
    run_candidates(line, cands, w8a16_reference(x.float(), wqs[0], ws), wqs)
    line.bf16_us = bf16_us(k, n, m, x)


def time_dense(label: str, k: int, n: int, m: int) -> None:
    """bf16 at the (shape, M) DENSE_GEMV_PLAN sends to the Triton GEMV, against cuBLAS."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies(n * k * 2))]
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    line = Line(label, "bf16", m, default="plan", nbytes=n * k * 2 + x.numel() * 2 + m * n * 2)
    LINES.append(line)
    tiles, counters = dense_tiles(k, n, m) or DENSE, counters_for(n, x.device)
    cands: dict[str, Callable[[Any], object]] = {
        "plan": lambda w: dense_gemv(x, w, None, counters, tiles),
        "cuBLAS": lambda w: torch.nn.functional.linear(x, w),
    }
    run_candidates(line, cands, torch.nn.functional.linear(x.float(), ws[0].float()), ws)
    line.bf16_us = line.times.get("cuBLAS", 0.0)


def gptq_case(m: int, n: int, k: int, bits: int, gs: int, act: bool, sym: bool, lo: int, name: str) -> None:
    """The GEMV on rows [lo, k) of a random RTN-quantized linear (with bias), against the fp32 reference."""
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
    for split in (None, 3):
        ok, rel = close(quant_gemv(xp, gw, bias, tiles=GEMV_TILES[name][bits], split_k=split), ref)
        ok &= int(gw.counters.abs().sum()) == 0
        print(f"{'PASS' if ok else 'FAIL'} int{bits} {name} M={m} N={n} K={k} gs={gs} act={act} sym={sym} lo={lo}"
              f" split={split} rel {rel:.1e}")  # fmt: skip


def correctness() -> None:
    print("== correctness (bf16 activations vs fp32 reference; rel = max err / max |ref|, PASS <= 1e-2)")
    for bits in (4, 8):
        for m, n, k, act, sym, lo, name in (
            (1, 520, 1408, False, False, 320, GEMV_DEFAULT),
            (1, 520, 1408, True, False, 0, "g2"),  # act order with lo = 0 only: an act-order row shard is not in
            (1, 520, 1408, False, False, 200, "g2"),  # whole groups, so the layers never give it to the GEMV
            (1, 520, 1408, False, False, 320, "g1mask"),
            (1, 520, 1408, True, False, 0, "g1pipe"),
            (1, 520, 1408, False, False, 200, "g1pipe"),
            (3, 264, 1024, True, False, 0, GEMV_DEFAULT),
            (8, 4096, 4096, False, True, 0, GEMV_DEFAULT),
        ):
            check(f"gptq int{bits} M={m}", partial(gptq_case, m, n, k, bits, 128, act, sym, lo, name))


def _due(what: str) -> bool:
    if time.time() - START < BUDGET_S:
        return True
    print(f"skipped {what}: time budget", flush=True)
    return False


def timings() -> None:
    print("== timings (CUDA graphs over weight copies > L2; GB/s of the bytes each call must read)")
    gptq_all, fp8_all = list(GEMV_TILES), list(FP8_GEMV_TILES)
    seven = [(lb, kn) for lb, kn in SHAPES.items() if lb.startswith("7b")]
    for label, (k, n) in seven:
        for bits in (4, 8):
            if _due(f"{label} int{bits} M=1"):
                check(f"{label} int{bits}", partial(time_gptq, label, k, n, bits, 1, gptq_all))
        if _due(f"{label} fp8 M=1"):
            check(f"{label} fp8", partial(time_fp8, label, k, n, 1, fp8_all))
    for label, (k, n) in seven:
        for bits in (4, 8):
            if _due(f"{label} int{bits} M=8"):
                check(
                    f"{label} int{bits} M=8",
                    partial(time_gptq, label, k, n, bits, 8, [GEMV_DEFAULT, "g1mask", "g1n256w8"]),
                )
        if _due(f"{label} fp8 M=8"):
            check(f"{label} fp8 M=8", partial(time_fp8, label, k, n, 8, ["n32k256w4", "n32k512pf0", "splitk"]))
    for label, (k, n) in seven:
        for max_m, _ in DENSE_GEMV_PLAN.get((k, n), ()):
            if _due(f"bf16 {label} M={max_m}"):
                check(f"bf16 {label}", partial(time_dense, label, k, n, max_m))
    for label, (k, n) in SHAPES.items():
        if not label.startswith("7b"):
            for bits in (4, 8):
                if _due(f"{label} int{bits} M=1"):
                    check(f"{label} int{bits}", partial(time_gptq, label, k, n, bits, 1, gptq_all))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true", help="CPU: compile the variants for sm_90 only")
    args = ap.parse_args()
    if args.compile:
        from gemv_compile import compile_all

        compile_all()
        return
    if not torch.cuda.is_available():
        print("no CUDA device: nothing checked (use --compile on a CPU)")
        return

    def timeout() -> None:
        print("TIMEOUT at 115 s: stopped", flush=True)
        summary()
        os._exit(0)

    watchdog = threading.Timer(115, timeout)
    watchdog.daemon = True
    watchdog.start()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    check("correctness", correctness)
    timings()
    summary()
    os._exit(0)  # the watchdog thread must not keep the process alive


if __name__ == "__main__":
    main()
