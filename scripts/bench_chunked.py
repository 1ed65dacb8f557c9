"""Chunked prefill and prefix caching on one GPU (issue 14): P11, P12 and the chunked 32k MFU, through the Engine
in this process (the calls a LoRAX router makes, without the gRPC hop), random weights of a named shape.

    python scripts/bench_chunked.py --shape 7b --out bench_out/bench_chunked.json

P11: time to first token of a prompt whose first --prefix tokens are cached (cache_len over the blocks an earlier
request computed), against the same prompt cold. P12: inter-token latency of a running decode batch while
--long-token prompts keep arriving (one every --arrive-every steps); with chunking (Prefill with cached_batch and
chunk_len within --budget, later chunks sized by the shard) and without (each prompt prefilled alone, then joined);
p99 / median of one running request's gaps between tokens. MFU: one --mfu-tokens prompt (NTK active) prefilled
whole and in chunks of each --mfu-chunks size. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bench_common import ROOT, SHAPES, build_model, matmul_rate
from worker.distributed import ParallelContext
from worker.engine.engine import Engine, EngineConfig
from worker.ops import ntk_alpha
from worker.pb import generate_pb2 as pb


class Tok:
    """The engine's view of a tokenizer, for random ids: every id is a one-byte token."""

    def __init__(self, vocab: int):
        self.n_real_vocab = vocab
        self.eos_token_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return [1] * len(text)

    def decode_bytes(self, ids: list[int], skip_special_tokens: bool = False) -> bytes:
        return b"x" * len(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "x" * len(ids)

    def token_text(self, token_id: int) -> str:
        return "x"

    def is_special(self, token_id: int) -> bool:
        return False


class Blocks:
    """The router's side of the KV blocks: a free list, blocks and slots per request."""

    def __init__(self, count: int, block_size: int):
        self.free, self.bs = list(range(count - 1, -1, -1)), block_size
        self.held: dict[int, list[int]] = {}

    def request(self, rid: int, ids: list[int], max_new: int, prefix: Sequence[int] = (), **kw: Any) -> pb.Request:
        n = len(ids) + max_new - 1
        own = [self.free.pop() for _ in range(math.ceil(n / self.bs) - len(prefix))]
        self.held[rid] = own
        blocks = list(prefix) + own
        slots = [b * self.bs + j for b in blocks for j in range(self.bs)][:n]
        return pb.Request(
            id=rid,
            inputs="",
            tokenized_inputs=pb.TokenizedInputs(ids=ids),
            parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
            blocks=blocks,
            slots=slots,
            **kw,
        )

    def release(self, rid: int) -> None:
        self.free += self.held.pop(rid, [])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def first_token(engine: Engine, req: pb.Request) -> float:
    """Seconds from the Prefill to the request's first token (through its later chunks, if any)."""

    def run() -> None:
        _, batch = engine.prefill(pb.Batch(id=req.id, requests=[req]), None)
        while batch is not None:
            _, batch = engine.decode([batch.info()])

    return timed(run)[1]


def ids_of(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def bench_prefix(engine: Engine, blocks: Blocks, args: argparse.Namespace, vocab: int, rid: int) -> dict[str, Any]:
    """P11: TTFT of prefix + suffix with the prefix's blocks cached (cache_len), against it cold."""
    prefix = ids_of(args.prefix, 1, vocab)
    first = blocks.request(rid, prefix + ids_of(args.suffix, 2, vocab), 1)
    engine.prefill(pb.Batch(id=rid, requests=[first]), None)  # computes the prefix blocks
    shared = list(first.blocks[: args.prefix // blocks.bs])
    cold, warm = [], []
    for i in range(args.repeats):
        prompt = prefix + ids_of(args.suffix, 10 + i, vocab)
        cold.append(first_token(engine, blocks.request(rid + 1 + 2 * i, prompt, 1)))
        req = blocks.request(rid + 2 + 2 * i, prompt, 1, prefix=shared, cache_len=len(shared) * blocks.bs)
        warm.append(first_token(engine, req))
    for r in list(blocks.held):
        blocks.release(r)
    c, w = statistics.median(cold), statistics.median(warm)
    return dict(prefix=args.prefix, suffix=args.suffix, cold_ms=c * 1e3, cached_ms=w * 1e3, ratio=w / c)


def bench_itl(engine: Engine, blocks: Blocks, args: argparse.Namespace, vocab: int, chunked: bool) -> dict[str, Any]:
    """P12: gaps between one running request's tokens while long prompts keep arriving."""
    engine.max_prefill_tokens = args.budget
    steps, base = args.itl_steps, 1000 if chunked else 2000
    running = [
        blocks.request(base + i, ids_of(args.ctx, base + i, vocab), steps + 64) for i in range(args.decode_batch)
    ]
    _, batch = engine.prefill(pb.Batch(id=base, requests=running), None)
    queue: list[int] = []  # arrived, not yet admitted: blocks are taken at admission
    stamps, watched, next_id = [], base, base + args.decode_batch

    def note(gens: list[Any]) -> None:
        for g in gens:
            if g.request_id == watched:
                stamps.append(time.perf_counter())
            if g.generated_text is not None and g.request_id >= base + args.decode_batch:
                blocks.release(g.request_id)

    for step in range(steps):
        if step % args.arrive_every == 0:
            queue.append(next_id)
            next_id += 1
        assert batch is not None  # the running requests outlive the loop
        room = args.budget - batch.info().current_tokens

        def admit() -> pb.Request:
            rid = queue.pop(0)
            return blocks.request(rid, ids_of(args.long, rid, vocab), args.long_new)

        if chunked and queue and room > 0:
            req = admit()
            req.chunk_len = min(room, args.long)
            gens, batch = engine.prefill(pb.Batch(id=req.id, requests=[req]), batch.info())
        elif not chunked and queue:
            req = admit()
            gens, new = engine.prefill(pb.Batch(id=req.id, requests=[req]), None)
            note(gens)
            refs = [batch.info()] + ([new.info()] if new is not None else [])
            gens, batch = engine.decode(refs)
        else:
            gens, batch = engine.decode([batch.info()])
        note(gens)
    engine.clear(None)
    for r in list(blocks.held):
        blocks.release(r)
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    median, p99 = gaps[len(gaps) // 2], gaps[min(len(gaps) - 1, math.ceil(0.99 * len(gaps)) - 1)]
    return dict(chunked=chunked, tokens=len(stamps), median_ms=median * 1e3, p99_ms=p99 * 1e3, ratio=p99 / median)


def bench_mfu(
    engine: Engine, blocks: Blocks, args: argparse.Namespace, vocab: int, matmul: float
) -> list[dict[str, Any]]:
    """One long prompt to its first token, whole and in chunks; MFU by scripts/bench.py's FLOP count."""
    c, n = engine.model.config, args.mfu_tokens
    H, L, W = c.hidden_size, c.num_hidden_layers, c.mlp_width
    flops = 2 * (3 * H * H + H * H + 3 * H * W) * L * n + 2 * H * c.vocab_size + L * 4 * H * n * n / 2
    prompt = ids_of(n, 7, vocab)
    rows: list[dict[str, Any]] = []
    for chunk in [0, *[int(x) for x in args.mfu_chunks.split(",") if x]]:
        engine.max_prefill_tokens = chunk or n
        times = []
        for i in range(args.repeats):
            rid = 5000 + 100 * chunk + i
            req = blocks.request(rid, prompt, 1)
            if chunk:
                req.chunk_len = chunk
            times.append(first_token(engine, req))
            blocks.release(rid)
        t = statistics.median(times)
        rows.append(dict(chunk=chunk or n, ms=t * 1e3, mfu=flops / t / matmul if matmul else None))
    for r in rows:
        r["of_unchunked"] = rows[0]["ms"] / r["ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-total-tokens", type=int, default=0, help="KV tokens (0: sized by Warmup from memory)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefix", type=int, default=4096, help="P11: cached prefix tokens")
    ap.add_argument("--suffix", type=int, default=128, help="P11: new tokens after the prefix")
    ap.add_argument("--budget", type=int, default=2048, help="P12: the router's max_batch_prefill_tokens")
    ap.add_argument("--decode-batch", type=int, default=32, help="P12: running requests")
    ap.add_argument("--ctx", type=int, default=512, help="P12: the running requests' prompt tokens")
    ap.add_argument("--long", type=int, default=8192, help="P12: tokens of each arriving prompt")
    ap.add_argument("--long-new", type=int, default=8, help="P12: tokens each arriving prompt generates")
    ap.add_argument("--arrive-every", type=int, default=4, help="P12: decode steps between arrivals")
    ap.add_argument("--itl-steps", type=int, default=200)
    ap.add_argument("--mfu-tokens", type=int, default=32768)
    ap.add_argument("--mfu-chunks", default="4096,8192")
    ap.add_argument("--only", default="prefix,itl,mfu")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "bench_chunked.json"))
    args = ap.parse_args()
    pctx = ParallelContext(device=torch.device(args.device))
    model = build_model(args.shape, pctx, args.backend)
    vocab = min(model.config.vocab_size, 150000)
    cfg = EngineConfig(block_size=args.block_size, max_total_tokens=args.max_total_tokens, memory_fraction=0.9)
    engine = Engine(model, Tok(vocab), pctx, cfg)  # type: ignore[arg-type]  # Tok has what the engine reads
    warm_len = max(args.mfu_tokens, args.long, args.prefix + args.suffix)
    warm = pb.Batch(id=0, requests=[pb.Request(id=0, tokenized_inputs=pb.TokenizedInputs(ids=[1] * warm_len))])
    engine.warmup(pb.WarmupRequest(batch=warm, max_input_length=warm_len, max_prefill_tokens=warm_len))
    blocks = Blocks(engine.router_blocks, args.block_size)
    only = set(args.only.split(","))
    res: dict[str, Any] = dict(
        shape=args.shape, backend=model.backend.name, kv_tokens=engine.max_supported_total_tokens
    )
    matmul = matmul_rate(pctx.device) if pctx.device.type == "cuda" else 0.0
    if "prefix" in only:
        res["P11"] = bench_prefix(engine, blocks, args, vocab, 100)
    if "itl" in only:
        res["P12"] = [bench_itl(engine, blocks, args, vocab, chunked) for chunked in (True, False)]
    if "mfu" in only:
        res["alpha"] = ntk_alpha(args.mfu_tokens, model.config.seq_length, True)
        res["MFU"] = bench_mfu(engine, blocks, args, vocab, matmul)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{args.shape}, backend {res['backend']}, {res['kv_tokens']} KV tokens")
    print("| row | measured | target |\n|---|---|---|")
    if "P11" in res:
        p = res["P11"]
        print(
            f"| P11 TTFT, {p['prefix']}-token prefix cached + {p['suffix']} new | {p['cached_ms']:.1f} ms vs cold "
            f"{p['cold_ms']:.1f} ms: {p['ratio']:.3f}x | <= 0.15x |"
        )
    for p in res.get("P12", []):
        mode = f"chunked, budget {args.budget}" if p["chunked"] else "unchunked"
        print(
            f"| P12 ITL p99/median ({mode}), {args.long}-token prompts every {args.arrive_every} steps | "
            f"{p['p99_ms']:.1f} / {p['median_ms']:.1f} ms = {p['ratio']:.2f} | <= 1.5 (chunked) |"
        )
    for r in res.get("MFU", []):
        mfu = f"MFU {r['mfu']:.2f}, " if r["mfu"] else ""
        print(
            f"| {args.mfu_tokens}-token prefill, chunks of {r['chunk']} | {r['ms']:.0f} ms, {mfu}"
            f"{r['of_unchunked']:.3f} of unchunked | >= 0.95 |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
