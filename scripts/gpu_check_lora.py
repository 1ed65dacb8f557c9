"""One GPU session's check of the multi-LoRA decode kernels (P2): correctness against the PyTorch reference
in bf16, then timings at the Qwen-7B shape, batch 32, 32 distinct rank-16 adapters, 32 layers of distinct
pools (the adapters' bytes come from HBM, not L2), each candidate replayed from a CUDA graph.

    PYTHONPATH=. python scripts/gpu_check_lora.py                 # on the GPU (< 150 s); always exits 0
    PYTHONPATH=. python scripts/gpu_check_lora.py --compile-only  # on a CPU: every config compiles for sm_90

Candidates per module: "two" (shrink + expand, today's path; optionally other K / N tiles) and "local"
(one launch, every program recomputes its row's h; worker/kernels/lora_decode.py) at several tiles;
"sync" (one launch, counters) is left out: measured slower (68.5 vs 43.4 us per layer). Tables: (1) the
adapter term alone, per module and per step (32 layers); (2) the base matmuls with the term through
LoraTerm, as a decode step runs it (the side stream included), against the base matmuls alone: a P2
proxy without attention. fp8 is not relevant here: the adapter pools are bf16.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worker.kernels import lora as two  # noqa: E402
from worker.kernels import lora_decode  # noqa: E402
from worker.kernels.lora_decode import LocalTiles  # noqa: E402
from worker.kernels.lora_reference import add_lora_reference  # noqa: E402
from worker.layers.lora import AdapterBatchData, LoraTerm  # noqa: E402

MODULES = {
    "c_attn": (1, 4096, 12288),
    "attn.c_proj": (1, 4096, 4096),
    "w2|w1": (2, 4096, 11008),
    "mlp.c_proj": (1, 11008, 4096),
}  # fmt: skip  (P, K, N) at TP=1
LAYERS, BATCH, RANK = 32, 32, 16
DEV, DT = "cuda", torch.bfloat16  # --cpu-smoke: the CPU, fp32 (Triton's interpreter), tiny shapes
P2_BASE_MS, P2_LORA_MS = 8.57, 10.25  # the last in-model P2 measurement (BENCHMARKS.md), for the projection
Add = Callable[..., None]  # f(y, x, a, b, ranks, data)


def _two(block_n: int = 0, decode_k: int = 256) -> Add:
    def add(y, x, a, b, ranks, data):
        seg = (data.starts, data.lens, data.slots, data.max_len)
        h = two.lora_shrink(x, a, ranks, *seg, decode_k=decode_k)
        two.lora_expand(y, h, b, ranks, *seg, block_n=block_n)

    return add


def _local(tiles: LocalTiles) -> Add:
    return lambda y, x, a, b, ranks, data: lora_decode.add_lora_decode_local(
        y, x, a, b, ranks, data.starts, data.slots, tiles
    )


CANDIDATES: dict[str, Callable[[], Add]] = {
    "two (now)": _two,
    "two bk512": partial(_two, 0, 512),
    "two bk512 bn512": partial(_two, 512, 512),
    "local": partial(_local, LocalTiles()),  # bk512 bn512 w8, n_split auto
    "local ns2": partial(_local, LocalTiles(n_split=2)),
    "local ns4": partial(_local, LocalTiles(n_split=4)),
    "local ns16": partial(_local, LocalTiles(n_split=16)),
    "local bk1024 bn1024 w16": partial(_local, LocalTiles(block_k=1024, block_n=1024, num_warps=16)),
    "local bk256 bn128 w4": partial(_local, LocalTiles(block_k=256, block_n=128, num_warps=4)),
}
CHECK_WIDE = ("two (now)", "local")  # also checked at r_max 64 (the server's default pool)


def pool(P: int, K: int, N: int, r_max: int, slots: int, g: torch.Generator, short: bool = False) -> tuple:
    """bf16 A [slots, P, r_max, K], B [slots, P, N, r_max], ranks [P, slots]: slots 1.. hold rank-16
    adapters (|h| and the term ~ 1), slot 0 zeros; `short`: the last slot rank 8 (a short rank loop)."""
    a = torch.zeros(slots, P, r_max, K, device=DEV, dtype=DT)
    b = torch.zeros(slots, P, N, r_max, device=DEV, dtype=DT)
    a[1:, :, :RANK].normal_(0, K**-0.5, generator=g)
    b[1:, :, :, :RANK].normal_(0, RANK**-0.5, generator=g)
    ranks = torch.full((P, slots), RANK, dtype=torch.int32, device=DEV)
    ranks[:, 0] = 0
    if short:
        ranks[:, -1] = 8
        a[-1, :, 8:] = 0
        b[-1, :, :, 8:] = 0
    return a, b, ranks


def check(name: str, make: Callable[[], Add], r_max: int) -> bool:
    """PASS when, on every module, the candidate's error against an fp32 reference is within twice the bf16
    reference's own (+1e-3 of the term's size), base rows are untouched and all is finite."""
    g = torch.Generator(device=DEV).manual_seed(0)
    worst, ok = 0.0, True
    for P, K, N in MODULES.values():
        a, b, ranks = pool(P, K, N, r_max, BATCH + 2, g, short=True)
        slots = torch.tensor([0, *range(1, BATCH - 3), BATCH + 1, 0, 3], device=DEV)  # base rows, a repeat
        data = AdapterBatchData.for_decode(slots)
        x = torch.randn(BATCH, K, device=DEV, generator=g).to(DT)
        y0 = (0.1 * torch.randn(BATCH, P * N, device=DEV, generator=g)).to(DT)
        y, ref, ref32 = y0.clone(), y0.clone(), y0.float().clone()
        make()(y, x, a, b, ranks, data)
        add_lora_reference(ref, x, a, b, data.token_idx, data.valid, data.slots)
        add_lora_reference(ref32, x.float(), a.float(), b.float(), data.token_idx, data.valid, data.slots)
        sync()
        scale = (ref32 - y0.float()).abs().max().item()
        err, ref_err = (y.float() - ref32).abs().max().item(), (ref.float() - ref32).abs().max().item()
        base = slots == 0
        good = bool(torch.isfinite(y).all()) and torch.equal(y[base], y0[base]) and err <= 2 * ref_err + 1e-3 * scale
        ok &= good
        worst = max(worst, err / scale)
        if not good:
            print(f"    {name} P{P} K{K} N{N} r_max {r_max}: max err {err:.4f} (bf16 reference {ref_err:.4f})")
    print(f"  {'PASS' if ok else 'FAIL'}  {name:24s} r_max {r_max:2d}: worst max |err| / max |term| {worst:.4f}")
    return ok


START = time.monotonic()
BUDGET_S = 130.0  # timings stop here (the whole run must stay under 150 s)


def over_budget(what: str) -> bool:
    if time.monotonic() - START < BUDGET_S:
        return False
    print(f"  (time budget of {BUDGET_S:.0f} s spent: {what} and the rest not timed)")
    return True


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def graph_ms(fn: Callable[[], None], replays: int = 10) -> float:
    """Median ms of one replay of a CUDA graph of fn (run once eagerly first: Triton compiles outside capture);
    on the CPU (--cpu-smoke) one eager call."""
    t0 = time.perf_counter()
    fn()
    sync()
    if DEV != "cuda":
        return (time.perf_counter() - t0) * 1e3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class Step:
    """LAYERS layers of the four modules' pools (distinct memory per layer), inputs and outputs."""

    def __init__(self, with_base: bool):
        g = torch.Generator(device=DEV).manual_seed(1)
        self.data = AdapterBatchData.for_decode(torch.arange(1, BATCH + 1, device=DEV))
        self.pools = {m: [pool(P, K, N, RANK, BATCH + 1, g) for _ in range(LAYERS)] for m, (P, K, N) in MODULES.items()}
        self.x = {m: torch.randn(BATCH, K, device=DEV).to(DT) for m, (P, K, N) in MODULES.items()}
        self.y = {m: torch.zeros(BATCH, P * N, device=DEV, dtype=DT) for m, (P, K, N) in MODULES.items()}
        self.w = {
            m: [torch.randn(P * N, K, device=DEV).to(DT) * K**-0.5 for _ in range(LAYERS)]
            for m, (P, K, N) in MODULES.items()
        } if with_base else {}  # fmt: skip

    def bytes(self, modules: list[str]) -> int:
        return sum(LAYERS * BATCH * RANK * P * (K + N) * 2 for m, (P, K, N) in MODULES.items() if m in modules)

    def run_terms(self, adds: dict[str, Add]) -> None:
        for layer in range(LAYERS):
            for m, add in adds.items():
                a, b, r = self.pools[m][layer]
                add(self.y[m], self.x[m], a, b, r, self.data)

    def run_linears(self, terms: dict[str, list[LoraTerm]] | None) -> None:
        """The base matmuls, each with its LoraTerm (None: the base alone)."""
        for layer in range(LAYERS):
            for m in MODULES:
                x, w = self.x[m], self.w[m][layer]
                base = partial(torch.nn.functional.linear, x, w)
                self.y[m] = base() if terms is None else terms[m][layer].apply(base, x, self.data)


def time_terms(step: Step) -> dict[str, dict[str, float]]:
    """ms per decode step (32 layers) of each candidate's adapter term, per module; failures print why."""
    table: dict[str, dict[str, float]] = {}
    for name, make in CANDIDATES.items():
        if over_budget(name):
            break
        row: dict[str, float] = {}
        for m in MODULES:
            try:
                add = make()
                row[m] = graph_ms(partial(step.run_terms, {m: add}))
            except Exception as exc:  # a candidate failing is a finding, not the end of the run
                print(f"  {name} {m}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        table[name] = row
    print(f"\n(1) adapter term alone, ms per decode step ({LAYERS} layers), batch {BATCH}, {BATCH} adapters:")
    print(f"  {'candidate':24s}" + "".join(f"{m:>13s}" for m in MODULES) + f"{'sum':>9s}{'GB/s':>8s}{'vs now':>8s}")
    now = sum(table["two (now)"].values()) if len(table.get("two (now)", {})) == len(MODULES) else float("nan")
    for name, row in table.items():
        total = sum(row.values()) if len(row) == len(MODULES) else float("nan")
        gbs = step.bytes(list(MODULES)) / total / 1e6
        cells = "".join(f"{row[m]:13.3f}" if m in row else f"{'-':>13s}" for m in MODULES)
        print(f"  {name:24s}{cells}{total:9.3f}{gbs:8.0f}{now / total:8.2f}x")
    return table


def best_per_module(table: dict[str, dict[str, float]]) -> dict[str, str]:
    return {m: min((row[m], name) for name, row in table.items() if m in row)[1] for m in MODULES}


def time_composed(step: Step, table: dict[str, dict[str, float]]) -> None:
    """The fastest candidate of each module, composed into one step's graph, against today's."""
    best = best_per_module(table)
    now = graph_ms(lambda: step.run_terms({m: CANDIDATES["two (now)"]() for m in MODULES}))
    adds = {m: CANDIDATES[best[m]]() for m in MODULES}
    mixed = graph_ms(lambda: step.run_terms(adds))
    lora = P2_LORA_MS - (now - mixed)
    print(f"\n  composed best per module {best}: {mixed:.3f} ms vs two (now) {now:.3f} ms per step")
    print(f"  projected P2 (in-model {P2_BASE_MS} / {P2_LORA_MS} ms, minus the saving): {P2_BASE_MS / lora:.3f}")


def time_linears(step: Step, table: dict[str, dict[str, float]]) -> None:
    """(2) the base matmuls with LoraTerm (how the model calls it) vs alone: a P2 proxy without attention."""
    stream = torch.cuda.Stream() if DEV == "cuda" else None
    best = best_per_module(table)
    local_best = {m: "local" if best[m].startswith("local") else "two" for m in MODULES}
    modes: dict[str, Callable[[str], tuple[str, Any]]] = {
        "now: two + side stream": lambda m: ("two", stream),
        "two": lambda m: ("two", None),
        "local": lambda m: ("local", None),
        "side (all on the side)": lambda m: ("side", stream),
        "table (1)'s best": lambda m: (local_best[m], stream if local_best[m] == "two" else None),
        "local if N > K else side": lambda m: ("local", None) if MODULES[m][2] > MODULES[m][1] else ("side", stream),
    }
    base = graph_ms(lambda: step.run_linears(None))
    print(f"\n(2) base matmuls of {LAYERS} layers, batch {BATCH}: {base:.3f} ms alone; with the adapter term:")
    first: dict[str, torch.Tensor] = {}
    for label, mode in modes.items():
        if over_budget(label):
            break
        try:
            terms = {
                m: [LoraTerm(a, b, r, two, mode(m)[1], decode=mode(m)[0]) for a, b, r in step.pools[m]] for m in MODULES
            }
            ms = graph_ms(partial(step.run_linears, terms))
            out = {m: step.y[m].float() for m in MODULES}  # the last layer's outputs, after the replays
            first = first or out
            diff = max(((out[m] - first[m]).abs().max() / first[m].abs().max()).item() for m in MODULES)
            print(
                f"  {label:24s} {ms:8.3f} ms  extra {ms - base:6.3f} ms  ratio {base / ms:.3f}  "
                f"max rel. diff vs now {diff:.4f}"
            )
        except Exception as exc:
            print(f"  {label:24s} FAILED {type(exc).__name__}: {str(exc)[:200]}")


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
        *[(f"two: expand decode BLOCK_N {bn} SPLIT_K {s}", partial(build, two._expand_kernel, expand_ptrs, expand_ints,
           dict(SPLIT_K=s, BLOCK_M=1, BLOCK_N=bn, BLOCK_R=16), 4)) for bn in (256, 512) for s in (4, 8)],
        *[(f"two: shrink decode BLOCK_K {bk} SPLIT_K {s}", partial(build, two._shrink_kernel, shrink_ptrs, shrink_ints,
           dict(SPLIT_K=s, BLOCK_M=1, BLOCK_R=16, BLOCK_K=bk), 4)) for bk in (256, 512) for s in (4, 8)],
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
    ap.add_argument("--compile-only", action="store_true", help="compile for --arch on a CPU, then exit")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--no-base", action="store_true", help="skip table (2), the base matmuls (13 GB of weights)")
    ap.add_argument("--cpu-smoke", action="store_true", help="TRITON_INTERPRET=1, tiny shapes: the script runs")
    args = ap.parse_args()
    if args.compile_only:
        compile_only(args.arch)
    if args.cpu_smoke:
        global DEV, DT, LAYERS, BATCH
        DEV, DT, LAYERS, BATCH = "cpu", torch.float32, 2, 6
        MODULES.update({m: (P, K // 64 + 5, N // 128 + 3) for m, (P, K, N) in MODULES.items()})
    elif not torch.cuda.is_available():
        print("gpu_check_lora.py: no CUDA GPU; nothing checked")
        return
    card = torch.cuda.get_device_name() if DEV == "cuda" else "CPU smoke run"
    print(f"{card}, torch {torch.__version__}; correctness ({DT}, the module shapes):")
    for name, make in CANDIDATES.items():
        for r_max in (16, 64) if name in CHECK_WIDE else (16,):
            try:
                check(name, make, r_max)
            except Exception:
                print(f"  FAIL  {name} r_max {r_max}: raised\n{traceback.format_exc(limit=3)}")
    for stage in ("terms", "linears"):
        try:
            if stage == "terms":
                step = Step(with_base=not args.no_base)
                table = time_terms(step)
                time_composed(step, table)
            elif not args.no_base:
                time_linears(step, table)
        except Exception:
            print(f"  stage {stage} FAILED:\n{traceback.format_exc(limit=4)}")


if __name__ == "__main__":
    main()
