"""One GPU session's check of the multi-LoRA decode kernels (P2): correctness against the PyTorch reference
in bf16, then timings at the Qwen-7B shape, batch 32, 32 distinct rank-16 adapters, 32 layers of distinct
pools (the adapters' bytes come from HBM, not L2), each candidate replayed from a CUDA graph.

    PYTHONPATH=. python scripts/gpu_check_lora.py          # on the GPU (< 150 s); always exits 0
    PYTHONPATH=. python scripts/gpu_check_lora_compile.py  # on a CPU: every config compiles for sm_90

Candidates per module (table 1, by name): "two" (shrink + expand, today's kernels) at other K tiles and K
splits (`per_sm`: programs per SM the shrink's K split aims at; more programs, more bytes in flight);
"local" (one launch; lost before: 2.19-3.27 ms); "side_store" (LoraTerm's decode mode: the expand writes
the whole term buffer, no zeroing launch, then one add; the side stream included). "sync" is left out
(68.5 vs 43.4 us per layer). Table (2): the base matmuls with the term through LoraTerm, as a decode step
runs it, against the base matmuls alone (a P2 proxy without attention), per decode mode, side-stream
priority and per_sm; plus a floor (a ready term, only the add per module) and, for the best mode, each
module's share. fp8 is not relevant here: the adapter pools are bf16. Ends with a SUMMARY.
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

from gpu_check_lora_summary import summary  # noqa: E402  (this script's folder is on sys.path)
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
P2_BASE_MS, P2_LORA_MS = 7.00, 8.47  # the last in-model P2 measurement (BENCHMARKS.md), for the projection
Add = Callable[..., None]  # f(y, x, a, b, ranks, data)


def _two(block_n: int = 0, decode_k: int = 256, per_sm: int = 2) -> Add:
    def add(y, x, a, b, ranks, data):
        seg = (data.starts, data.lens, data.slots, data.max_len)
        h = two.lora_shrink(x, a, ranks, *seg, decode_k=decode_k, per_sm=per_sm)
        two.lora_expand(y, h, b, ranks, *seg, block_n=block_n)

    return add


def _term(decode: str, per_sm: int = 2, priority: int | None = None) -> Add:
    """LoraTerm's decode mode on its pools, with a side stream (of `priority`; None: none) on the GPU."""
    stream = torch.cuda.Stream(priority=priority) if DEV == "cuda" and priority is not None else None

    def add(y, x, a, b, ranks, data):
        LoraTerm(a, b, ranks, two, stream, decode=decode, per_sm=per_sm).apply(lambda: y, x, data)  # y += term

    return add


def _local(tiles: LocalTiles) -> Add:
    return lambda y, x, a, b, ranks, data: lora_decode.add_lora_decode_local(
        y, x, a, b, ranks, data.starts, data.slots, tiles
    )


CANDIDATES: dict[str, Callable[[], Add]] = {
    "two (now)": _two,
    "two s4": partial(_two, 0, 256, 4),
    "two s8": partial(_two, 0, 256, 8),
    "two s8 bk128": partial(_two, 0, 128, 8),
    "two s16 bk128": partial(_two, 0, 128, 16),
    "two s8 bn128": partial(_two, 128, 256, 8),  # twice the expand's programs
    "local": partial(_local, LocalTiles()),  # bk512 bn512 w8, n_split auto
    "side (term + add)": partial(_term, "side", 2, 0),
    "side_store (term + add)": partial(_term, "side_store", 2, 0),
    "side_store s8 (term + add)": partial(_term, "side_store", 8, 0),
}
CHECK_WIDE = ("two (now)", "two s8", "side_store (term + add)")  # also checked at r_max 64 (the server's default pool)


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
        self.delta = {m: torch.full_like(y, 0.01) for m, y in self.y.items()}
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

    def run_floor(self) -> None:
        """The base matmuls plus a ready term (only the add): the side modes' least cost on the critical path."""
        for layer in range(LAYERS):
            for m in MODULES:
                self.y[m] = torch.nn.functional.linear(self.x[m], self.w[m][layer]).add_(self.delta[m])

    def run_linears(self, terms: dict[str, list[LoraTerm]] | None) -> None:
        """The base matmuls, each with its LoraTerm (None, or a module not in terms: the base alone)."""
        for layer in range(LAYERS):
            for m in MODULES:
                x, w = self.x[m], self.w[m][layer]
                base = partial(torch.nn.functional.linear, x, w)
                self.y[m] = base() if terms is None or m not in terms else terms[m][layer].apply(base, x, self.data)


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
    cells = {m: [(row[m], name) for name, row in table.items() if m in row] for m in MODULES}
    return {m: min(c)[1] for m, c in cells.items() if c}


def time_composed(step: Step, table: dict[str, dict[str, float]], res: dict[str, Any]) -> None:
    """The fastest candidate of each module, composed into one step's graph, against today's."""
    best = best_per_module(table)
    now = graph_ms(lambda: step.run_terms({m: CANDIDATES["two (now)"]() for m in MODULES}))
    adds = {m: CANDIDATES[best[m]]() for m in MODULES}
    mixed = graph_ms(lambda: step.run_terms(adds))
    res["alone"] = (now, mixed, best)
    print(f"\n  composed best per module {best}: {mixed:.3f} ms vs two (now) {now:.3f} ms per step")


MODES: dict[str, tuple[str, int | None, int]] = {  # label -> (LoraTerm.decode, side stream priority, per_sm)
    "now: side": ("side", 0, 2),  # (None: no side stream; -1: high priority, its blocks go first)
    "side_store": ("side_store", 0, 2),
    "side hi-prio": ("side", -1, 2),
    "side_store hi-prio": ("side_store", -1, 2),
    "side_store s8": ("side_store", 0, 8),
    "side_store hi-prio s8": ("side_store", -1, 8),
    "two + side stream": ("two", 0, 2),
    "two": ("two", None, 2),
}


def terms_of(step: Step, label: str, modules: tuple[str, ...] = tuple(MODULES)) -> dict[str, list[LoraTerm]]:
    decode, priority, per_sm = MODES[label]
    stream = torch.cuda.Stream(priority=priority) if DEV == "cuda" and priority is not None else None
    return {m: [LoraTerm(a, b, r, two, stream, decode, per_sm) for a, b, r in step.pools[m]] for m in modules}


def time_linears(step: Step, res: dict[str, Any]) -> None:
    """(2) the base matmuls with LoraTerm (how the model calls it) vs alone: a P2 proxy without attention;
    then the floor (a ready term: only the add per module) and the best mode's cost per module."""
    base = graph_ms(lambda: step.run_linears(None))
    res["base"], rows = base, res.setdefault("modes", {})
    print(f"\n(2) base matmuls of {LAYERS} layers, batch {BATCH}: {base:.3f} ms alone; with the adapter term:")
    first: dict[str, torch.Tensor] = {}
    for label in [*MODES, "floor: base + add"]:
        if over_budget(label):
            break
        try:
            ms = graph_ms(
                step.run_floor if label.startswith("floor") else partial(step.run_linears, terms_of(step, label))
            )
            out = {m: step.y[m].float() for m in MODULES}  # the last layer's outputs, after the replays
            first = first or out
            diff = max(((out[m] - first[m]).abs().max() / first[m].abs().max()).item() for m in MODULES)
            rows[label] = (ms, diff)
            print(
                f"  {label:24s} {ms:8.3f} ms  extra {ms - base:6.3f} ms  ratio {base / ms:.3f}  diff vs now {diff:.4f}"
            )
        except Exception as exc:
            print(f"  {label:24s} FAILED {type(exc).__name__}: {str(exc)[:200]}")
    timed = {k: v for k, v in rows.items() if k in MODES}
    if timed:
        res["best_mode"] = min(timed, key=lambda k: timed[k][0])
    per_module(step, base, list(timed), res)


def per_module(step: Step, base: float, labels: list[str], res: dict[str, Any]) -> None:
    """Extra ms per step of each module alone with the term, per mode; then each module's best mode composed
    into one step (LoraTerm's mode is per target: SlotPool.wrap_targets may pick it per module)."""
    print(f"  extra ms per step, one module with the term:  {''.join(f'{m:>13s}' for m in MODULES)}")
    cells: dict[str, dict[str, float]] = {}
    for label in labels:
        if over_budget(f"per module {label}"):
            break
        cells[label] = {m: graph_ms(partial(step.run_linears, terms_of(step, label, (m,)))) - base for m in MODULES}
        print(f"    {label:42s}" + "".join(f"{cells[label][m]:13.3f}" for m in MODULES))
    if not cells or over_budget("the composed modes"):
        return
    best = {m: min(cells, key=lambda k: cells[k][m]) for m in MODULES}
    terms = {m: terms_of(step, best[m], (m,))[m] for m in MODULES}
    ms = graph_ms(partial(step.run_linears, terms))
    res["composed"] = (best, ms)
    print(f"  composed best mode per module {best}: extra {ms - base:.3f} ms  ratio {base / ms:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-base", action="store_true", help="skip table (2), the base matmuls (13 GB of weights)")
    ap.add_argument("--cpu-smoke", action="store_true", help="TRITON_INTERPRET=1, tiny shapes: the script runs")
    args = ap.parse_args()
    if args.cpu_smoke:
        global DEV, DT, LAYERS, BATCH
        DEV, DT, LAYERS, BATCH = "cpu", torch.float32, 2, 6
        MODULES.update({m: (P, K // 64 + 5, N // 128 + 3) for m, (P, K, N) in MODULES.items()})
    elif not torch.cuda.is_available():
        print("gpu_check_lora.py: no CUDA GPU; nothing checked")
        return
    card = torch.cuda.get_device_name() if DEV == "cuda" else "CPU smoke run"
    print(f"{card}, torch {torch.__version__}; correctness ({DT}, the module shapes):")
    passed: dict[str, bool] = {}
    for name, make in CANDIDATES.items():
        for r_max in (16, 64) if name in CHECK_WIDE else (16,):
            try:
                passed[f"{name} r_max {r_max}"] = check(name, make, r_max)
            except Exception:
                passed[f"{name} r_max {r_max}"] = False
                print(f"  FAIL  {name} r_max {r_max}: raised\n{traceback.format_exc(limit=3)}")
    res: dict[str, Any] = {}
    for stage in ("inputs", "linears", "terms"):  # the step proxy first: it decides the default
        try:
            if stage == "inputs":
                step = Step(with_base=not args.no_base)
            elif stage == "terms":
                time_composed(step, time_terms(step), res)
            elif not args.no_base:
                time_linears(step, res)
        except Exception:
            print(f"  stage {stage} FAILED:\n{traceback.format_exc(limit=4)}")
    summary(passed, res, MODES, P2_BASE_MS, P2_LORA_MS)


if __name__ == "__main__":
    main()
