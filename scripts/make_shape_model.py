"""Write a Qwen v1 checkpoint of a benchmark shape (scripts/bench_common.py SHAPES) with random bf16 weights and
the proxy vocabulary (scripts/proxy_vocab.py; its first tokens for shapes with a small vocabulary) as its
qwen.tiktoken, so that whole-stack benchmarks (shards,
router, HTTP front) can run at a real model's size. Weights are drawn on the given device, written as
safetensors shards of at most --shard-gb each.

    python scripts/make_shape_model.py --shape 7b --out /tmp/qwen7b-random [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file

from bench_common import SHAPES, build_model
from demo_tokenizer import write_tiktoken_file
from make_demo_model import hf_state
from proxy_vocab import proxy_vocab
from worker.distributed import ParallelContext
from worker.tokenizer import SPECIAL_TOKEN_NAMES


def config(shape: str, n_real_vocab: int) -> dict:
    s = SHAPES[shape]
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": s["hidden_size"],
        "num_attention_heads": s["num_attention_heads"],
        "kv_channels": s["hidden_size"] // s["num_attention_heads"],
        "num_hidden_layers": s["num_hidden_layers"],
        "intermediate_size": s["intermediate_size"],
        "vocab_size": s["vocab_size"],
        "max_position_embeddings": s["seq_length"],
        "seq_length": s["seq_length"],
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "layer_norm_epsilon": 1e-6,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "no_bias": True,
        "tie_word_embeddings": False,
        "bf16": True,
        "tokenizer_class": "QWenTokenizer",
        "eos_token_id": n_real_vocab,  # <|endoftext|>, the first special token
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    a = ap.parse_args()
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    vocab = proxy_vocab()[: SHAPES[a.shape]["vocab_size"] - len(SPECIAL_TOKEN_NAMES)]  # small shapes: fewer tokens
    write_tiktoken_file(os.path.join(a.out, "qwen.tiktoken"), {t: i for i, t in enumerate(vocab)})
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config(a.shape, len(vocab)), f, indent=2)
    model = build_model(a.shape, ParallelContext(device=torch.device(a.device)), "auto")
    state = hf_state(model)
    del model
    weight_map: dict[str, str] = {}
    groups: list[list[str]] = [[]]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if groups[-1] and size + nbytes > a.shard_gb * 2**30:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    for i, group in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n].cpu() for n in group}, os.path.join(a.out, fn), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fn))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    print(f"{a.shape}: {total / 1e9:.2f} GB in {len(groups)} files under {a.out} ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
