"""One GPU session's check of the batch-1 decode floor candidates (issue 17, P1; worker/layers/decode_kernels.py):

    PYTHONPATH=. python3 scripts/gpu_check_p1.py     # one H200, < 150 s, SUMMARY block printed last; exits 0

Rows (fields of DecodeKernels, switched on one model instance by apply_decode_kernels):
  baseline      all off (today's kernels before issue 17)
  default       what `serve` runs by default (decode_kernels.SERVED: pdl, rope_store)
  def+act_gemv  the default and mlp.c_proj as a Triton GEMV computing up * silu(gate) while reading its input
                (M = 1 only, ACT_GEMV_MAX_M; at batch 8 the row equals the default)
  def-attn_pdl  the default with the paged decode attention launched plainly (PDL's share there)
  pdl           programmatic dependent launch for the Triton GEMVs, the fused RMSNorm / RoPE / SiLU-mul / RoPE+store
                kernels and the paged decode attention; rope_store RoPE (+ logn) and the KV store in one kernel

1. Kernels, bf16, each against its PyTorch reference: the act GEMV equals dense_gemv(silu_mul(gate_up)) bit for bit
   and F.linear(ops.silu_mul(gate_up)) within bf16 noise (M = 1 and 8, 7B mlp.c_proj, every tile tried); each
   kernel launched with PDL equals its plain launch bit for bit.
2. Kernel timings in CUDA graphs (32 distinct weights per graph, so nothing stays in L2): mlp.c_proj as cuBLAS +
   SiLU-mul (today) vs the act GEMV per tile; a ln -> c_attn GEMV -> RoPE chain of 32 layers plain and with PDL
   (whether the programmatic edges survive capture shows here).
3. The 7B-shaped model (random bf16 weights), ctx 512, batch 1 and 8: graphed step time and P1 (step / weight+KV
   copy floor) of each candidate, timed in alternating rounds; logits max-abs-diff of each candidate's graph against
   the baseline's eager step and against its own eager step (the default must be 0 on both: PDL and rope_store change
   no arithmetic; act_gemv sums in another order, so bf16 noise: within 2 % of the largest logit).
SUMMARY: per batch the step times, P1, the gain over the baseline and whether each candidate is exact, then what to
make default. A candidate joins SERVED only if this says it is faster AND exact.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import DecodeInputs, build_model, copy_bandwidth, cuda_time, weight_bytes  # noqa: E402
from worker import ops  # noqa: E402
from worker.kernels import fused  # noqa: E402
from worker.kernels.gemv import GemvTiles, counters_for  # noqa: E402
from worker.kernels.gemv_dense import DENSE, DENSE_N64, DENSE_PF0, act_tiles, dense_gemv  # noqa: E402
from worker.layers.decode_kernels import SERVED, DecodeKernels, apply_decode_kernels  # noqa: E402

START = time.time()
DEFAULT = DecodeKernels(**dict.fromkeys(SERVED, True))  # what `serve` runs (--decode-kernels' default)
CANDIDATES = {  # the baseline (all off), the served default, then the default with each remaining candidate
    "baseline": DecodeKernels(),
    "default": DEFAULT,
    "def+act_gemv": replace(DEFAULT, act_gemv=True),  # act GEMV at M = 1 only (ACT_GEMV_MAX_M)
    "def-attn_pdl": DEFAULT,  # the paged decode attention launched plainly (PDL elsewhere): its PDL's share
}
ATTN_PLAIN = {"def-attn_pdl"}
ACT_TILES = {"dense": DENSE, "dense_pf0": DENSE_PF0, "n64": DENSE_N64, "n64_k256": GemvTiles(64, 256, 4, 3, False)}
SUMMARY: list[str] = []
CHECKS: list[tuple[str, bool]] = []
_printed = threading.Event()


def check(label: str, ok: bool, detail: str = "") -> bool:
    CHECKS.append((label, ok))
    print(f"{'PASS' if ok else 'FAIL'}  {label}  {detail}", flush=True)
    return ok


def graph_time(fn: Callable[[], object], per: int = 1) -> float:
    """Median µs per `per` calls of fn, replayed from a CUDA graph."""
    from worker.engine.cuda_graphs import capture

    g, _ = capture(fn)  # type: ignore[arg-type]
    return cuda_time(g.replay, iters=20) * 1e6 / per


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


# ------------------------------------------------------------------------------------------- 1 + 2: kernels
def kernels(dev: torch.device) -> None:
    k, n, layers = 11008, 4096, 32
    g = torch.Generator(device=dev).manual_seed(0)
    ws = [torch.randn(n, k, device=dev, generator=g).mul_(0.02).bfloat16() for _ in range(layers)]
    cnt = counters_for(n, dev)
    for m in (1, 8):
        gu = torch.randn(m, 2 * k, device=dev, generator=g).mul_(3).bfloat16()
        two_ref = torch.nn.functional.linear(ops.silu_mul(gu).float(), ws[0].float())

        def today(gu: torch.Tensor = gu) -> None:  # cuBLAS after the SiLU-mul kernel, as the model runs it now
            for w in ws:
                torch.nn.functional.linear(fused.silu_mul(gu), w)

        times = {"cublas+silu_mul": graph_time(today, layers)}
        for name, tiles in ACT_TILES.items():
            out = dense_gemv(gu, ws[0], None, cnt, tiles, act=True)
            same = torch.equal(out, dense_gemv(fused.silu_mul(gu), ws[0], None, cnt, tiles))
            r = rel(out, two_ref)
            ok = check(f"act GEMV M={m} tiles {name}", same and r < 2e-2, f"bitwise={same} rel={r:.1e}")
            if ok:

                def act(t: GemvTiles = tiles, gu: torch.Tensor = gu) -> None:
                    for w in ws:
                        dense_gemv(gu, w, None, cnt, t, act=True)

                times[f"act_gemv[{name}]"] = graph_time(act, layers)
        default = act_tiles(k, n, m)
        print(f"mlp.c_proj M={m} (us/call, 32 weights cycled; act_tiles default {default}):")
        for name, us in times.items():
            print(f"  {name:24s} {us:8.2f}")
        best = min(times, key=times.__getitem__)
        SUMMARY.append(f"mlp.c_proj M={m}: today cublas+silu_mul {times['cublas+silu_mul']:.2f} us; best {best} "
                       f"{times[best]:.2f} us")  # fmt: skip
    ws.clear()  # free before the next section
    pdl_chain(dev)


def pdl_chain(dev: torch.device) -> None:
    """32 x (RMSNorm with residual -> c_attn GEMV -> RoPE): with and without PDL (bitwise equal), timed."""
    h, n, layers = 4096, 12288, 32
    g = torch.Generator(device=dev).manual_seed(1)
    ws = [torch.randn(n, h, device=dev, generator=g).mul_(0.02).bfloat16() for _ in range(layers)]
    b = torch.randn(n, device=dev, generator=g).bfloat16()
    nw = torch.ones(h, device=dev, dtype=torch.bfloat16)
    x = torch.randn(1, h, device=dev, generator=g).bfloat16()
    cos, sin = torch.rand(1, 64, device=dev), torch.rand(1, 64, device=dev)
    cnts = [counters_for(n, dev) for _ in range(layers)]

    def chain(pdl: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            y, res = x, x
            for i in range(layers):
                normed, res = fused.rms_norm(y, nw, 1e-6, res, pdl=pdl)
                qkv = dense_gemv(normed, ws[i], b, cnts[i], DENSE_PF0, pdl=pdl)
                q, kk, _ = qkv.view(1, 3, h // 128, 128).unbind(1)
                fused.rotary_(q, kk, cos, sin, None, pdl=pdl)
                y = qkv[:, :h] * 0.5  # keeps the chain's values bounded
            return y

        return run

    same = torch.equal(chain(True)(), chain(False)())
    check("PDL chain (rms_norm, dense_gemv, rotary) equals the plain launches", same)
    t = {name: graph_time(chain(pdl), layers) for name, pdl in (("plain", False), ("pdl", True))}
    line = ", ".join(f"{name} {us:.2f}" for name, us in t.items())
    print(f"ln -> c_attn -> rope chain, us per layer: {line}")
    SUMMARY.append(f"ln->c_attn->rope chain, us per layer: {line} (PDL bitwise: {same})")
    SUMMARY.append(
        f"programmatic edges in the captured PDL chain's graph (DOT dump): {programmatic_edges(chain(True))}"
    )


def programmatic_edges(fn: Callable[[], object]) -> str:
    """How many edges of fn's captured graph the CUDA DOT dump calls programmatic (0: capture dropped PDL)."""
    try:  # keep_graph: the captured graph stays (not instantiated, not freed) for the dump
        g = torch.cuda.CUDAGraph(keep_graph=True)
        g.enable_debug_mode()
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            fn()
        path = os.path.join(tempfile.mkdtemp(prefix="gpu_check_p1_"), "graph.dot")
        g.debug_dump(path)
        with open(path) as f:
            text = f.read()
        return f"{text.lower().count('programmatic')} occurrences of 'programmatic' in {len(text)} chars"
    except Exception as exc:  # the dump is a diagnostic only
        return f"not available ({type(exc).__name__}: {str(exc)[:120]})"


# ------------------------------------------------------------------------------------------- 3: the model
def model_steps(dev: torch.device) -> None:
    from worker.distributed import ParallelContext
    from worker.engine.cuda_graphs import capture
    from worker.engine.kv_cache import KVCache

    model = build_model("7b", ParallelContext(0, 1, dev), "triton")
    c, ctx, bs = model.config, 512, 16
    kv = KVCache(c.num_hidden_layers, 2 + 8 * (ctx // bs + 2), bs, c.num_attention_heads, c.head_dim,
                 torch.bfloat16, dev)  # fmt: skip
    bw = copy_bandwidth(dev)
    kv_tok = KVCache.bytes_per_token(c.num_hidden_layers, c.num_attention_heads, c.head_dim, torch.bfloat16)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for batch in (1, 8):
        torch.manual_seed(batch)
        step = DecodeInputs.build(model, batch, ctx, bs).step(model, kv.layers)
        floor = (weight_bytes(model) + batch * (ctx + 1) * kv_tok) / bw
        graphs: dict[str, Any] = {}
        base_eager = None
        for name, opts in CANDIDATES.items():  # the PDL ones last: a failed capture is reported, the rest go on
            try:
                apply_decode_kernels(model.transformer, opts)
                model.backend.pdl = opts.pdl and name not in ATTN_PLAIN
                eager = step().float().clone()
                base_eager = eager if base_eager is None else base_eager
                g, out = capture(step)
                g.replay()
                torch.cuda.synchronize()
            except Exception:
                traceback.print_exc()
                check(f"b={batch} {name}: eager step and graph capture", False)
                continue
            d_base = float((out.float() - base_eager).abs().max())
            d_self = float((out.float() - eager).abs().max())
            reorders = opts.act_gemv and batch == 1  # another summation order: bf16 noise
            exact = d_self == 0 and (rel(out, base_eager) < 2e-2 if reorders else d_base == 0)
            check(f"b={batch} {name}: graph vs own eager {d_self:.3g}, vs baseline eager {d_base:.3g}", exact,
                  f"(|logits| max {float(base_eager.abs().max()):.2f})")  # fmt: skip
            graphs[name] = (g, out, exact)
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(3):  # alternating rounds, best median
            for name, (g, _, _) in graphs.items():
                times[name].append(cuda_time(g.replay, iters=30))
        base = min(times.get("baseline", [float("nan")]))
        print(f"batch {batch}, ctx {ctx}: floor {floor * 1e3:.3f} ms")
        for name, ts in times.items():
            t = min(ts)
            line = (f"b={batch} {name:9s} step {t * 1e3:.3f} ms  P1 {t / floor:.3f}  "
                    f"gain {(base - t) * 1e6:+.1f} us/step  exact {graphs[name][2]}")  # fmt: skip
            print(line)
            SUMMARY.append(line)
        if "default" in times:
            better = [n for n, ts in times.items() if min(ts) < min(times["default"]) and graphs[n][2]]
            SUMMARY.append(f"b={batch}: exact rows faster than the default: {better or 'none'} (baseline "
                           f"{'faster' if 'baseline' in better else 'slower'} than the default)")  # fmt: skip
        apply_decode_kernels(model.transformer, CANDIDATES["baseline"])
        del graphs
        torch.cuda.empty_cache()


def print_summary() -> None:
    if _printed.is_set():
        return
    _printed.set()
    print("\nSUMMARY (issue 17, P1 target <= 1.2; a candidate becomes default only if faster AND exact)")
    for line in SUMMARY:
        print("  " + line)
    fails = [label for label, ok in CHECKS if not ok]
    print(f"  checks: {len(CHECKS) - len(fails)} PASS, {len(fails)} FAIL" + (f": {fails}" if fails else ""))
    print(f"  wall {time.time() - START:.0f} s", flush=True)


def _watchdog() -> None:
    """Past 140 s: the summary of what ran, and out (the run's limit is 150 s)."""
    print_summary()
    os._exit(0)


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    dev = torch.device("cuda", 0)
    threading.Timer(140, _watchdog).start()
    for section in (model_steps, kernels):
        try:
            section(dev)
        except Exception:  # report and go on: the script always finishes with its summary
            traceback.print_exc()
            check(f"section {section.__name__} ran", False)
        torch.cuda.empty_cache()
    print_summary()
    os._exit(0)


if __name__ == "__main__":
    main()
