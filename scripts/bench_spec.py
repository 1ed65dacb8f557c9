"""P10: speculative decoding with prompt lookup, through the Engine in this process (the calls a LoRAX router
makes, without the gRPC hop), on one GPU: batch-1 decode tokens/s with drafts against without, on an input-copy
and an open-ended workload, and the cost of a verify step (B·(S+1) rows) against a plain decode step at
batch 1/8/32/64, so the batch sizes where speculation still pays can be read off.

    python scripts/bench_spec.py --shape 7b --out bench_out/bench_spec.json               # one H200, < 3 min
    python scripts/bench_spec.py --shape tiny --device cpu --backend torch --batches 1,2 --ctx 48 --new 12

What is measured, and why it is honest. Random weights do not copy their input, so drafts would never be
accepted. The model here has the 7B shape and reads and computes exactly what the 7B does (every weight is read,
every matmul runs), but its weights are rigged so that its greedy output is known: the attention and MLP output
projections are zero (every layer adds nothing to the residual stream) and the LM head row of token succ(x) is
the embedding of x, so the model answers succ(x) after x, where succ walks one fixed random cycle through the
vocabulary. The engine, the prompt lookup and the verification are the real ones; only the acceptance comes
from the workload, which we build so that it resembles the tasks prompt lookup is for:

- copy: each prompt holds a passage of the cycle (later generated again) with every --edit-every-th token
  replaced, as in a document that the answer quotes with small edits, then filler, then the passage's first
  token; drafts are accepted until an edit, the step after an edit has no match, then lookup resumes.
  `exact` (no edits) makes every step a full verify step: its time per step is the verify cost.
- open: the prompt holds the tokens the output will have, shuffled, between random tokens: every step finds
  a one-token match and proposes drafts that are rejected, until the lookup switches itself off for the
  request (worker/engine/prompt_lookup.py). Real open-ended text accepts some drafts, so this is a lower bound.

Every speculative run must produce the same tokens as the run without drafts (greedy is exact), and the copy
runs the tokens of the cycle (the rigging works): a mismatch is reported in the table. Prints a table last and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from bench_chunked import Blocks, Tok
from bench_common import ROOT, SHAPES, build_model
from worker.distributed import ParallelContext
from worker.engine.engine import Engine, EngineConfig
from worker.pb import generate_pb2 as pb


def rig_successor(model: Any, vocab: int, seed: int) -> list[int]:
    """Make the model answer succ[x] after token x (see the module docstring); returns succ."""
    order = list(range(vocab))
    random.Random(seed).shuffle(order)
    succ = [0] * vocab
    for a, b in zip(order, order[1:] + order[:1]):
        succ[a] = b
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
                p.zero_()
        wte, head = model.transformer.wte.weight, model.lm_head.weight  # [V, H] each (TP = 1)
        head.zero_()
        head[torch.tensor(succ, device=head.device)] = wte[:vocab]
    return succ


def chain(succ: list[int], start: int, n: int) -> list[int]:
    out = [start]
    while len(out) < n:
        out.append(succ[out[-1]])
    return out


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    expect: list[list[int]] | None  # the generated tokens, when the workload fixes them


def build_workload(kind: str, succ: list[int], batch: int, args: argparse.Namespace, seed: int) -> Workload:
    """`batch` prompts of args.ctx tokens, each on its own stretch of the cycle (see the module docstring)."""
    rng, vocab, n, ctx = random.Random(seed), len(succ), args.new, args.ctx
    prompts, expect = [], []
    for _ in range(batch):
        start = rng.randrange(vocab)
        passage = chain(succ, start, n + 1)
        if kind == "open":
            shuffled = passage[1:]
            rng.shuffle(shuffled)
            noise = [rng.randrange(vocab) for _ in range(ctx - 1 - len(shuffled))]
            body = [t for pair in zip(shuffled, noise) for t in pair] + noise[len(shuffled) :] + shuffled[len(noise) :]
            prompts.append(body + [start])
        else:
            every = args.edit_every if kind == "copy" else 0
            quoted = [rng.randrange(vocab) if every and k % every == every - 1 else t for k, t in enumerate(passage)]
            filler = [rng.randrange(vocab) for _ in range(ctx - 1 - len(quoted))]
            prompts.append(quoted + filler + [start])
        expect.append(passage[1:])
    return Workload(kind, prompts, expect)


def run(engine: Engine, blocks: Blocks, w: Workload, drafts: int, rid: int, args: argparse.Namespace) -> dict[str, Any]:
    """Prefill the workload (not timed, in batches within the prefill budget), then decode to the end, timed.
    Returns tokens/s, ms per step, accepted tokens per request-step, the verify steps replayed from the verify
    CUDA graphs and those run eagerly, and the generated tokens."""
    assert engine.runner is not None
    graphs = engine.runner.verify_graphs  # captured at Warmup when speculative_tokens > 0 (engine/graphed_verify.py)
    before = dict(graphs.verify_steps) if graphs is not None else {}
    engine.cfg.speculative_tokens = drafts
    per = max(1, engine.max_prefill_tokens // args.ctx)
    out: dict[int, list[int]] = {}
    batches = []
    for g in range(0, len(w.prompts), per):
        reqs = [blocks.request(rid + i, p, args.new) for i, p in enumerate(w.prompts[g : g + per], start=g)]
        gens, b = engine.prefill(pb.Batch(id=rid + g, requests=reqs), None)
        for gen in gens:
            out.setdefault(gen.request_id, []).extend(gen.next_tokens.ids)
        if b is not None:
            batches.append(b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    steps = rows = tokens = 0
    t0 = time.perf_counter()
    refs = batches  # several after a split prefill: the first Decode concatenates them
    while refs:
        gens, batch = engine.decode([b.info() for b in refs])
        steps += 1
        for gen in gens:
            out.setdefault(gen.request_id, []).extend(gen.next_tokens.ids)
            rows += 1
            tokens += len(gen.next_tokens.ids)
        refs = [batch] if batch is not None else []
    elapsed = time.perf_counter() - t0
    for i in range(len(w.prompts)):
        blocks.release(rid + i)
    got = [out.get(rid + i, []) for i in range(len(w.prompts))]
    return dict(
        verify={k: n - before[k] for k, n in graphs.verify_steps.items()} if graphs is not None else None,
        tok_s=tokens / elapsed,
        ms_per_step=1e3 * elapsed / max(steps, 1),
        steps=steps,
        accepted_per_step=tokens / max(rows, 1),
        cycle_ok=w.expect is None or got == w.expect,
        tokens=got,
    )


def compare(engine: Engine, blocks: Blocks, w: Workload, s: int, rid: int, args: argparse.Namespace) -> dict[str, Any]:
    """The workload without drafts and with up to `s`, the fastest of args.repeats runs each (the first run at a
    new batch size may compile kernels); same tokens required."""
    runs = [
        [run(engine, blocks, w, drafts, rid + 1000 * (2 * k + (drafts > 0)), args) for k in range(args.repeats)]
        for drafts in (0, s)
    ]
    off, on = (max(r, key=lambda x: x["tok_s"]) for r in runs)
    same = on.pop("tokens") == off.pop("tokens")
    return dict(
        workload=w.name,
        batch=len(w.prompts),
        off=off,
        on=on,
        speedup=on["tok_s"] / off["tok_s"],
        step_cost=on["ms_per_step"] / off["ms_per_step"],
        same_tokens=same,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--speculate", type=int, default=4, help="S: prompt-lookup drafts per step")
    ap.add_argument("--ctx", type=int, default=512, help="prompt tokens per request")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--edit-every", type=int, default=12, help="copy workload: every n-th quoted token is edited")
    ap.add_argument("--batches", default="1,8,32,64", help="batch sizes of the verify-cost rows")
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement (the fastest counts)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "bench_spec.json"))
    args = ap.parse_args()
    if args.ctx < args.new + 2:
        ap.error(f"--ctx ({args.ctx}) must hold the quoted passage: at least --new + 2 ({args.new + 2})")
    pctx = ParallelContext(device=torch.device(args.device))
    model = build_model(args.shape, pctx, args.backend)
    vocab = min(model.config.vocab_size, 150000)
    succ = rig_successor(model, vocab, seed=0)
    cfg = EngineConfig(block_size=args.block_size, memory_fraction=0.9, speculative_tokens=args.speculate)
    engine = Engine(model, Tok(vocab), pctx, cfg)  # type: ignore[arg-type]  # Tok has what the engine reads
    batches = [int(b) for b in args.batches.split(",")]
    budget = max(4096, args.ctx)
    warm = pb.Batch(id=0, requests=[pb.Request(id=0, tokenized_inputs=pb.TokenizedInputs(ids=[1] * budget))])
    engine.warmup(pb.WarmupRequest(batch=warm, max_input_length=budget, max_prefill_tokens=budget))
    blocks = Blocks(engine.router_blocks, args.block_size)
    s = args.speculate
    assert engine.runner is not None
    graphs = engine.runner.verify_graphs
    compare(engine, blocks, build_workload("exact", succ, 2, args, 99), s, 100_000, args)  # compiles both paths
    res: dict[str, Any] = dict(shape=args.shape, backend=model.backend.name, speculate=s, ctx=args.ctx, new=args.new)
    res["verify_buckets"] = sorted(graphs.graphs) if graphs is not None else []
    res["P10"] = [
        compare(engine, blocks, build_workload(k, succ, 1, args, 1), s, 200_000, args) for k in ("copy", "open")
    ]
    res["verify"] = [
        compare(engine, blocks, build_workload(k, succ, b, args, 2 + b), s, 300_000 + 1000 * b, args)
        for b in batches
        for k in ("exact", "copy")
        if b > 1 or k == "exact"  # batch 1's copy row is P10's
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print_table(res, args)


def graphed(verify: dict[str, int] | None) -> str:
    """'graphed/all' of a run's verify steps; '-' without verify graphs."""
    return "-" if verify is None else f"{verify['graphed']}/{verify['graphed'] + verify['eager']}"


def print_table(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{res['shape']}, backend {res['backend']}, S = {res['speculate']} prompt-lookup drafts,")
    print(f"{res['ctx']}-token prompts, {res['new']} new tokens each, copy edits every {args.edit_every}")
    buckets = res["verify_buckets"]
    print(f"verify CUDA graphs: {len(buckets)} buckets (R, T) {buckets}" if buckets else "verify steps: eager")
    print("| row | off tok/s | on tok/s | speed-up | tokens/step | step ms off / on | verify steps graphed | target |")
    print("|---|---|---|---|---|---|---|---|")
    target = {"copy": ">= 2x", "open": ">= 0.95x", "exact": ""}
    for r in res["P10"] + res["verify"]:
        flags = "" if r["same_tokens"] and r["on"]["cycle_ok"] else " MISMATCH"
        label = f"P10 batch 1, {r['workload']}" if r in res["P10"] else f"batch {r['batch']}, {r['workload']}"
        if r["workload"] == "exact":
            label += f" ({r['batch'] * (res['speculate'] + 1)} verify rows)"
        print(
            f"| {label}{flags} | {r['off']['tok_s']:.0f} | {r['on']['tok_s']:.0f} | {r['speedup']:.2f}x | "
            f"{r['on']['accepted_per_step']:.2f} | {r['off']['ms_per_step']:.2f} / {r['on']['ms_per_step']:.2f} "
            f"({r['step_cost']:.2f}x) | {graphed(r['on']['verify'])} | "
            f"{target[r['workload']] if r in res['P10'] else ''} |"
        )
    print(
        "verify cost: the `exact` rows' step-ms ratio is what one verify step (B·(S+1) rows) costs against a plain "
        "step; speculation pays at a batch size while tokens/step exceeds it"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
