"""A/B of decode-step variants in one process, the method of BENCHMARKS.md's A/Bs: one model with the served decode
kernels, each variant's CUDA graph captured and timed in turn, the variants alternating over rounds, so that the
drift of a card (and between cards: every device call may land on another host) falls on all of them alike.

    python scripts/ab_decode.py served new:src=var/new --quant int4 --batches 1,2 --rounds 3
    python scripts/ab_decode.py served together:tiles=decode_newest_apart=0 --batches 8,32
    python scripts/ab_decode.py cuda:long1=65536,long2=65536 triton:long1=1,long2=1 --ctx 2048

A variant is NAME or NAME:SETTINGS, a comma list of
  src=DIR      a CUDA library built from DIR's edited copies of its sources (worker/kernels' files where DIR has
               none): the GPTQ library (gptq_gemv.cu, gptq_mma.cu, gptq_tc.cu) or the decode attention
               (paged_decode.cu), whichever DIR holds; gptq_cuda.cuh from DIR too where it has one
  tiles=SPEC   the attention backend's Tiles (Tiles.parse; ';' between knobs)
  formB=SxD    paged_decode_cuda.FORMS[B] (the cluster's blocks, the chunks in flight) at decode batch B
  longB=N      paged_decode_cuda.LONG_CONTEXT[B]
  kernels=SPEC the DecodeKernels fields on ('+' between them; 'none': all off) instead of the served set
  set=M.NAME=N worker/kernels/M.py's integer constant NAME set to N (a plan's knob, e.g. gemv_cuda.TC_LONG_K=2)
  plan=NxK=WxS gptq_tc's plan for an N x K linear (columns x rows): W warps a block over S splits of K, staged or
               not (the variant's calls decide)
  plan=NxK=W   gptq_tc's warps a block for an N x K gate | up pair (DecodeKernels.gptq_act_out); one plan a shape
  drop=LAUNCH  timing only, values wrong: one of each layer's five launches of the norm-folded decode (GPTQ Int4 at
               1-2 rows with norm_fold, as served) left out, its output a constant buffer: c_attn, attention,
               attn.c_proj, gate_up or mlp.c_proj (drop= again for more). The step's drop bounds what any change to
               that launch can gain (BENCHMARKS.md, 2026-12-01). c_attn's reaches layers 1-31 (layer 0's follows the
               unfolded ln_1) and mlp.c_proj's layers 0-30 (the last has no norm after it); a drop that never ran
               (another path: bf16, more rows, norm_fold off) fails the variant
Every variant starts from the defaults; the last table gives each variant's step times over the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(os.path.dirname(HERE), "worker", "kernels")
LIBRARIES = {  # library stem -> (its module, its sources)
    "gptq_gemv": ("worker.kernels.gemv_cuda", ("gptq_gemv.cu", "gptq_mma.cu", "gptq_tc.cu")),
    "paged_decode": ("worker.kernels.paged_decode_cuda", ("paged_decode.cu",)),
}
HEADER = "gptq_cuda.cuh"


@dataclass
class Variant:
    name: str
    src: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)  # stem -> sources, headers
    tiles: str = ""
    forms: dict[int, tuple[int, int]] = field(default_factory=dict)
    long: dict[int, int] = field(default_factory=dict)
    kernels: str = ""  # parse_decode_kernels' spec ("": the served set)
    consts: dict[tuple[str, str], int] = field(default_factory=dict)  # (worker.kernels module, name) -> value
    plans: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # (N, K) -> (warps, splits; 0: pair)
    drops: tuple[str, ...] = ()  # DROPS' launches left out (timing only)


def parse_variant(text: str, kernels: str = KERNELS) -> Variant:
    """NAME[:SETTINGS] (the module docstring) -> Variant; a bad setting raises ValueError naming it."""
    name, _, settings = text.partition(":")
    if not name:
        raise ValueError(f"variant {text!r}: no name")
    v = Variant(name)
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"variant {name}: {item!r} is not key=value")
        if key == "src":
            held = set(os.listdir(value)) if os.path.isdir(value) else set()
            hits = sorted(stem for stem, (_, files) in LIBRARIES.items() if held & set(files))
            if len(hits) != 1:
                raise ValueError(f"variant {name}: {value} holds the sources of {hits or 'no library'}")
            stem = hits[0]
            files = (*LIBRARIES[stem][1], HEADER)  # from DIR where it has them
            paths = [os.path.join(value if f in held else kernels, f) for f in files]
            v.src[stem] = (tuple(paths[:-1]), (paths[-1],))
        elif key == "tiles":
            v.tiles = value.replace(";", ",")
        elif key == "kernels":
            from worker.layers.decode_kernels import parse_decode_kernels

            v.kernels = value.replace("+", ",")
            parse_decode_kernels(v.kernels)  # a bad field name fails here, before the GPU work
        elif key == "set":
            target, _, number = value.partition("=")
            module, _, const = target.partition(".")
            if not (module and const and re.fullmatch(r"-?\d+", number)):
                raise ValueError(f"variant {name}: {item!r}: set is MODULE.NAME=INTEGER")
            old = getattr(_kernel_module(module), const, None)
            if not isinstance(old, int) or isinstance(old, bool):
                raise ValueError(f"variant {name}: {item!r}: worker.kernels.{module} has no integer {const}")
            v.consts[(module, const)] = int(number)
        elif key == "plan":
            shape, _, plan = value.partition("=")
            dims, ws = shape.split("x"), plan.split("x")
            if len(dims) != 2 or len(ws) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in dims + ws):
                raise ValueError(f"variant {name}: {item!r}: plan is NxK=WxS (a linear) or NxK=W (a gate | up pair)")
            nk = (int(dims[0]), int(dims[1]))
            if nk in v.plans:
                raise ValueError(f"variant {name}: {item!r}: a second plan for {shape}")
            v.plans[nk] = (int(ws[0]), int(ws[1]) if len(ws) == 2 else 0)
        elif key == "drop":
            if value not in DROPS:
                raise ValueError(f"variant {name}: drop {value!r}: one of {', '.join(DROPS)}")
            v.drops += (value,)
        elif key.startswith(("form", "long")) and key[4:].isdigit():
            if key.startswith("form"):
                blocks, _, depth = value.partition("x")
                if not (blocks.isdigit() and depth.isdigit()):
                    raise ValueError(f"variant {name}: {item!r}: a form is SPLITSxDEPTH")
                v.forms[int(key[4:])] = (int(blocks), int(depth))
            else:
                v.long[int(key[4:])] = int(value)
        else:
            raise ValueError(
                f"variant {name}: unknown setting {key!r} (src, tiles, formB, longB, kernels, set, plan, drop)"
            )
    return v


def _drops() -> dict[str, tuple[Any, str, Any]]:
    """drop=LAUNCH's patches: (class, method, its stand-in), each returning what the launch would (shape, dtype, a
    contiguous row-major layout), from constant buffers (`_const`) instead of computing it."""
    from worker.layers.norm import Deferred
    from worker.layers.quantized import _GPTQ
    from worker.models import qwen

    def rows(t: Any, n: int) -> Any:  # the first n values of t as [rows, n], contiguous (a view: no launch)
        return t.reshape(-1)[: t.shape[0] * n].view(t.shape[0], n)

    def squares(like: Any) -> Any:  # the norm fold's squares of like's rows (128 tiles: any count serves the timing)
        import torch

        return _const((like.shape[0], 128), like.device, torch.float32)

    def attend_only(self: Any, x: Any, ctx: Any, kv: Any, norm: Any, residual: Any) -> Any:
        o = self.attend(x, ctx, kv)
        return Deferred(o, squares(o), norm.eps), residual

    def act_only(self: Any, x: Any, norm: Any, residual: Any) -> Any:
        a = self.act_deferred(x)
        return Deferred(rows(a, residual.shape[1]), squares(a), norm.eps), residual

    def c_attn_only(self: Any, x: Any, ctx: Any, kv: Any, parts: Any = None) -> Any:
        c_attn: Any = qwen.unwrapped(self.c_attn)
        qkv = c_attn.forward_scaled(x) if isinstance(x, Deferred) else self.c_attn(x, ctx)
        return rows(qkv, self.num_heads * self.head_dim)

    def c_attn_out(self: Any, x: Any) -> Any:  # q, k, v of the rows
        return _const((x.x.shape[0], self.scales.shape[1]), x.x.device, x.x.dtype)

    def activation(self: Any, x: Any) -> Any:  # mlp.c_proj's input: its Int4 words' rows x 8
        c_proj: Any = qwen.unwrapped(self.c_proj)
        return _const((x.x.shape[0], c_proj.qweight.shape[0] * 8), x.x.device, x.x.dtype)

    return {
        "c_attn": (_GPTQ, "forward_scaled", c_attn_out),
        "attention": (qwen.FlashQwenAttention, "attend", c_attn_only),
        "attn.c_proj": (qwen.FlashQwenAttention, "forward_norm", attend_only),
        "gate_up": (qwen.QwenMLP, "act_deferred", activation),
        "mlp.c_proj": (qwen.QwenMLP, "forward_norm", act_only),
    }  # fmt: skip


DROPS = ("c_attn", "attention", "attn.c_proj", "gate_up", "mlp.c_proj")
_CONSTS: dict[tuple[Any, ...], Any] = {}


def _const(shape: tuple[int, ...], device: Any, dtype: Any = None) -> Any:
    """A constant buffer of `shape` on `device` (bf16 unless said), one a shape for the whole run."""
    import torch

    key = (shape, str(device), dtype or torch.bfloat16)
    if key not in _CONSTS:
        _CONSTS[key] = torch.full(shape, 0.01, dtype=key[2], device=device)
    return _CONSTS[key]


def _kernel_module(name: str) -> Any:
    """worker.kernels.NAME (ValueError where there is none)."""
    import importlib

    if not name.isidentifier():
        raise ValueError(f"{name!r} is not a module name")
    try:
        return importlib.import_module(f"worker.kernels.{name}")
    except ImportError as e:
        raise ValueError(f"no module worker.kernels.{name}: {e}") from e


@contextlib.contextmanager
def applied(v: Variant, backend: Any) -> Iterator[None]:
    """The variant's libraries, forms, thresholds, tiles, constants and plans in place for the block; the defaults
    back after it."""
    import importlib

    from worker.kernels import paged_decode_cuda as pdc
    from worker.kernels.triton_attention import Tiles

    modules: dict[str, Any] = {stem: importlib.import_module(mod) for stem, (mod, _) in LIBRARIES.items()}
    saved_src = {stem: (m.SOURCES, m.HEADERS) for stem, m in modules.items()}
    saved = (pdc.FORMS, pdc.LONG_CONTEXT, backend.tiles)
    consts = {(m, c): (mod, getattr(mod, c)) for m, c in v.consts for mod in [_kernel_module(m)]}
    gemv = modules["gptq_gemv"]
    plans = (gemv.plan_tc, gemv.plan_tc_pair)
    patches = [(d, *_drops()[d]) for d in v.drops]
    originals = [(cls, meth, cls.__dict__[meth]) for _, cls, meth, _ in patches]
    ran: dict[str, int] = dict.fromkeys(v.drops, 0)
    try:
        for d, cls, meth, stand_in in patches:
            setattr(cls, meth, _counted(stand_in, ran, d))
        if v.plans:
            gemv.plan_tc, gemv.plan_tc_pair = _planned(v.plans, *plans)
        for (m, c), value in v.consts.items():
            setattr(consts[(m, c)][0], c, value)
        for stem, (sources, headers) in v.src.items():
            modules[stem].SOURCES, modules[stem].HEADERS = sources, headers
            modules[stem].library.cache_clear()
        pdc.FORMS = {**pdc.FORMS, **v.forms}
        pdc.LONG_CONTEXT = {**pdc.LONG_CONTEXT, **v.long}
        if v.tiles:
            backend.tiles = Tiles.parse(v.tiles)
        yield
        idle = [d for d, n in ran.items() if not n]
        if idle:
            raise RuntimeError(
                f"variant {v.name}: drop={','.join(idle)} never ran: the step does not take the norm-folded "
                "decode (GPTQ Int4 at 1-2 rows with norm_fold)"
            )
    finally:
        for stem in v.src:
            modules[stem].SOURCES, modules[stem].HEADERS = saved_src[stem]
            modules[stem].library.cache_clear()
        pdc.FORMS, pdc.LONG_CONTEXT, backend.tiles = saved
        for (_, c), (module, old) in consts.items():
            setattr(module, c, old)
        gemv.plan_tc, gemv.plan_tc_pair = plans
        for cls, meth, original in reversed(originals):
            setattr(cls, meth, original)


def _counted(fn: Any, ran: dict[str, int], name: str) -> Any:
    """fn, counting its calls in ran[name]."""

    def call(*args: Any, **kwargs: Any) -> Any:
        ran[name] += 1
        return fn(*args, **kwargs)

    return call


def _planned(plans: dict[tuple[int, int], tuple[int, int]], plan_tc: Any, plan_tc_pair: Any) -> tuple[Any, Any]:
    """gemv_cuda.plan_tc and plan_tc_pair with `plans`' shapes forced (warps, splits; splits 0: a pair's warps)."""

    def tc(n: int, k: int, sms: int, rows: int, stage: bool = True) -> tuple[int, int, int]:
        warps, splits = plans.get((n, k), (0, 0))
        if not splits:
            return plan_tc(n, k, sms, rows, stage)
        from worker.kernels.gemv_cuda import CHUNK, tc_plan

        return tc_plan(k // CHUNK, splits, warps)

    def pair(n: int, k: int, sms: int) -> int:
        warps, splits = plans.get((n, k), (0, 1))
        return plan_tc_pair(n, k, sms) if splits else warps

    return tc, pair


def prebuild(variants: list[Variant], major: int, minor: int) -> None:
    """Build every variant's libraries at once (nvcc in parallel processes, into the build cache)."""
    jobs = {(stem, s, h) for v in variants for stem, (s, h) in v.src.items()}
    code = (
        "import sys; from worker.kernels.cuda_build import build, find_nvcc; a = sys.argv; "
        "build(a[1], tuple(a[2].split('|')), tuple(a[3].split('|')), int(a[4]), int(a[5]), find_nvcc())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, stem, "|".join(s), "|".join(h), str(major), str(minor)])
        for stem, s, h in sorted(jobs)
    ]
    if any(p.wait() for p in procs):
        raise SystemExit("a variant's library did not build (nvcc's message above)")


def main() -> None:
    sys.path.insert(0, HERE)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME or NAME:SETTINGS (see the module docstring)")
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--quant", default="int4", help="bf16 or a bench_quant.py mode (int4, int8, fp8)")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = [parse_variant(t) for t in args.variants]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("variant names must differ")
    batches = [int(b) for b in args.batches.split(",")]

    import torch

    import bench_quant
    from bench_common import copy_bandwidth
    from worker.layers.decode_kernels import SERVED, apply_decode_kernels, parse_decode_kernels

    dev = torch.device("cuda")
    prebuild(variants, *torch.cuda.get_device_capability(dev))
    bw = copy_bandwidth(dev)
    model = bench_quant.build(args.shape, bench_quant.MODES[args.quant], device=dev)
    print(f"{torch.cuda.get_device_name(dev)}, copy {bw / 1e9:.0f} GB/s, {args.shape} {args.quant}, ctx {args.ctx}")
    times: dict[str, list[list[float]]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            with applied(v, model.backend):
                # the variant's kernels, their plans and handles from its libraries
                apply_decode_kernels(model.transformer, parse_decode_kernels(v.kernels or ",".join(SERVED)))
                rows = {
                    row["batch"]: row.get("graph_ms", float("nan"))
                    for row in bench_quant.bench_decode(model, batches, args.ctx, bw)
                }
            times[v.name].append([rows[b] for b in batches])
            line = "  ".join(f"batch {b} {t:.4f} ms" for b, t in zip(batches, times[v.name][-1]))
            print(f"round {r}: {v.name:16s} {line}", flush=True)
    print("\n| variant | " + " | ".join(f"batch {b} (ms)" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for v in variants:
        cols = [sorted(t[i] for t in times[v.name]) for i in range(len(batches))]
        print(f"| {v.name} | " + " | ".join(", ".join(f"{x:.3f}" for x in c) for c in cols) + " |")


if __name__ == "__main__":
    main()
