"""P14: a batch-32 decode step with 32 JSON-schema-constrained requests / the same step unconstrained.

Both are the Decode RPC's body on an Engine in this process (forward, llguidance masks, sampling, matcher
advance, stop checks; CUDA graphs and the look-ahead where they apply), at the same batch size and context.
Steps are timed only while all `--batch` requests are live: when a constrained request completes its JSON,
the batch is replaced by a fresh one. CPU: the demo model and its tokenizer. GPU: a model shape with random
weights (bench_common) and a proxy vocabulary of Qwen's size (151,643 byte tokens: words, CJK, punctuation and
whitespace runs, plus the 208 specials); mask cost depends on the vocabulary, not on the weights.

    python scripts/bench_structured.py                      # CPU, demo model
    python scripts/bench_structured.py --device cuda --shape 7b
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bench_common import ROOT, SHAPES, build_model
from proxy_vocab import QWEN_BPE_TOKENS, proxy_vocab
from worker.distributed import ParallelContext
from worker.engine.batch import Batch
from worker.engine.engine import Engine, EngineConfig
from worker.pb import generate_pb2 as pb
from worker.tokenizer import SPECIAL_TOKEN_NAMES, QwenTokenizer

# A record with free text, bounded so that a request completes now and then (the batch is then replaced).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 60},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 6},
        "note": {"type": "string", "maxLength": 400},
    },
    "required": ["name", "age", "color", "tags", "note"],
    "additionalProperties": False,
}


@dataclass
class Result:
    device: str
    model: str
    batch: int
    ctx: int
    vocab: int
    steps: int
    unconstrained_ms: float  # median Decode step, wall clock
    constrained_ms: float
    ratio: float  # P14: constrained / unconstrained, target <= 1.10
    mask_ms: float  # median time the step spent getting its masks (waiting for a prefetch, or computing)
    fill_ms: float  # median time computing one step's masks (llguidance, mostly in the background)
    refills: int  # constrained batches replaced because a request completed


def proxy_tokenizer(seed: int = 0) -> QwenTokenizer:
    """Qwen's vocabulary size with made-up tokens (scripts/proxy_vocab.py); prompts are sent as ids."""
    tokens = proxy_vocab(seed)
    special = {name: QWEN_BPE_TOKENS + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
    token_bytes = tokens + [name.encode() for name in SPECIAL_TOKEN_NAMES]
    return QwenTokenizer(lambda text, allowed: list(text.encode()), token_bytes, special)


def requests(first_id: int, n: int, ctx: int, tok: QwenTokenizer, constrained: bool, max_new: int) -> list[Any]:
    rng = random.Random(first_id)
    params = pb.NextTokenChooserParameters(do_sample=True, temperature=1.0, top_p=1.0, typical_p=1.0, seed=first_id)
    params.repetition_penalty = 1.0
    if constrained:
        params.schema = json.dumps(SCHEMA)
    stop = pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True)
    return [
        pb.Request(
            id=first_id + i,
            tokenized_inputs=pb.TokenizedInputs(ids=[rng.randrange(tok.first_special_id) for _ in range(ctx)]),
            parameters=params,
            stopping_parameters=stop,
        )
        for i in range(n)
    ]


@dataclass
class Side:
    """One of the two workloads: its live batch and what was measured on it."""

    constrained: bool
    first_id: int  # request and batch ids of the two sides never meet
    batch: Batch | None = None
    times: list[float] = field(default_factory=list)  # Decode wall times at the full batch
    masks: list[float] = field(default_factory=list)  # time the step spent getting its masks
    fills: list[float] = field(default_factory=list)  # mask computations (prefetches) during those steps
    refills: int = 0  # batches started


Logs = dict[str, list[float]]  # "masks": the step getting its masks; "fills": mask computations


def run_chunk(engine: Engine, tok: QwenTokenizer, a: argparse.Namespace, side: Side, logs: Logs) -> None:
    """`a.chunk` decode steps of this side's batch, the first untimed (the other side ran just before; a look-ahead
    may be in flight). A batch that loses a request (its JSON is complete) is replaced before the next step."""
    for k in range(a.chunk):
        if side.batch is None or len(side.batch.requests) < a.batch:
            if side.batch is not None:
                engine.clear(side.batch.id)
            ids = side.first_id + side.refills * a.batch
            reqs = requests(ids, a.batch, a.ctx, tok, side.constrained, a.max_new)
            _, side.batch = engine.prefill(pb.Batch(id=ids, requests=reqs, size=a.batch), None)
            side.refills += 1
            continue
        start, logged = time.perf_counter(), {k: len(v) for k, v in logs.items()}
        _, side.batch = engine.decode([side.batch.info()])
        if a.device == "cuda":
            torch.cuda.synchronize()
        if k > 0 and side.batch is not None and len(side.batch.requests) == a.batch:
            side.times.append(time.perf_counter() - start)
            side.masks += logs["masks"][logged["masks"] :]
            side.fills += logs["fills"][logged["fills"] :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--shape", default="7b", choices=list(SHAPES), help="GPU: the model shape (random weights)")
    ap.add_argument("--demo-dir", default="", help="CPU: the demo model's directory (default: built in a temp dir)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=0, help="prompt tokens (default: 512 on GPU, 32 on CPU)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps each (default: 100 on GPU, 30 on CPU)")
    ap.add_argument("--chunk", type=int, default=6, help="steps of one side before the other's turn")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "bench_structured.json"))
    a = ap.parse_args()
    gpu = a.device == "cuda"
    a.ctx = a.ctx or (512 if gpu else 32)
    a.steps = a.steps or (100 if gpu else 30)
    pctx = ParallelContext(device=torch.device(a.device))
    if a.chunk < 2:
        ap.error("--chunk must be at least 2 (its first step is not timed)")
    a.max_new = (a.steps // (a.chunk - 1) + 2) * a.chunk + 8  # the unconstrained batch lives through the run
    slots = 2 * a.batch * (a.ctx + a.max_new + 16) + 4096
    cfg = EngineConfig(max_total_tokens=slots, shard_block_fraction=0.9, max_seq_len=4096)
    if gpu:
        model, tok, name = build_model(a.shape, pctx, "auto"), proxy_tokenizer(), a.shape
    else:
        from make_demo_model import ensure
        from worker.models.qwen import FlashQwenForCausalLM

        model_dir = os.path.join(ensure(a.demo_dir or tempfile.mkdtemp(prefix="demo")), "model")
        model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
        tok, name = QwenTokenizer.from_dir(model_dir), "demo"
    engine = Engine(model, tok, pctx, cfg)
    logs: Logs = {"masks": [], "fills": []}

    def timed(name: str) -> None:
        real = getattr(engine.grammars, name)

        def run(grammars: Any) -> Any:
            start = time.perf_counter()
            out = real(grammars)
            if out is not None:
                logs["masks" if name == "masks" else "fills"].append(time.perf_counter() - start)
            return out

        setattr(engine.grammars, name, run)  # instrumentation

    timed("masks")
    timed("_fill")
    free, constrained = Side(False, 1), Side(True, 2**40)
    while min(len(free.times), len(constrained.times)) < a.steps:  # in turns: load drift hits both alike
        run_chunk(engine, tok, a, free, logs)
        run_chunk(engine, tok, a, constrained, logs)
    ms = 1e3 * statistics.median(free.times), 1e3 * statistics.median(constrained.times)
    result = Result(
        device=torch.cuda.get_device_name() if gpu else "cpu",
        model=name,
        batch=a.batch,
        ctx=a.ctx,
        vocab=tok.n_real_vocab,
        steps=a.steps,
        unconstrained_ms=round(ms[0], 3),
        constrained_ms=round(ms[1], 3),
        ratio=round(ms[1] / ms[0], 3),
        mask_ms=round(1e3 * statistics.median(constrained.masks), 3),
        fill_ms=round(1e3 * statistics.median(constrained.fills or [0.0]), 3),
        refills=constrained.refills - 1,
    )
    print(json.dumps(asdict(result)))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(asdict(result), f, indent=1)


if __name__ == "__main__":
    main()
