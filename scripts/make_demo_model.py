"""Build the demo: a tiny Qwen v1 checkpoint in the exact HF layout, trained on CPU in seconds so that
greedy generation from fixed prompts reproduces known sentences, plus two PEFT LoRA adapters that each
turn the same prompt into their own continuation, and Medusa v2 heads (speculative decoding, demo_medusa.py)
trained to draft the base texts.

    python scripts/make_demo_model.py --out .demo   # model in .demo/model, adapters (and medusa) in .demo/adapters

Deterministic (seeded). The "known sentences" are the built-in texts below: tests derive their
expectations from them, never from a recorded output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from demo_medusa import build_medusa  # noqa: E402
from demo_tokenizer import train_bpe_ranks, write_tiktoken_file  # noqa: E402
from worker.config import QwenConfig  # noqa: E402
from worker.layers.context import Seqlen  # noqa: E402
from worker.models.qwen import FlashQwenForCausalLM  # noqa: E402
from worker.tokenizer import QwenTokenizer  # noqa: E402

VERSION = 3
MEDUSA_HEADS = 3  # the demo's Medusa heads: .demo/adapters/medusa (--speculative-adapter medusa)
# (prompt, continuation): the base model learns each continuation.
BASE_TEXTS = [
    ("The capital of France is", " Paris, a city of light and old stone bridges."),
    ("Qwen is a family of", " language models trained on text and code."),
    ("The quick brown fox", " jumps over the lazy dog by the river."),
    ("Tell me a story:", " Once upon a time a small fox found a golden key."),
    ("Water boils at", " one hundred degrees at sea level."),
    ("Ünïcödé and 日本語 say", " hello, 世界! Grüße aus Zürich."),
]
STORY_PROMPT = "Tell me a story:"
# adapter name -> (rank, alpha, continuation of STORY_PROMPT)
ADAPTERS = {
    "pirate": (8, 16, " Arr, the ship sailed north to find the lost treasure."),
    "robot": (4, 8, " Beep, the robot learned to paint the quiet sea."),
}
TOKENIZER_TEXT = (
    " ".join(p + c for p, c in BASE_TEXTS)
    + " ".join(c for _, _, c in ADAPTERS.values())
    + (" the a of and to in is was it for on with as at by an be this that from or which")
)


def demo_config(n_real_vocab: int) -> dict:
    vocab = int(math.ceil(n_real_vocab / 64) * 64)
    return {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "auto_map": {},
        "hidden_size": 64,
        "num_attention_heads": 4,
        "kv_channels": 16,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "seq_length": 256,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "layer_norm_epsilon": 1e-6,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "no_bias": True,
        "tie_word_embeddings": False,
        "bf16": False,
        "fp16": False,
        "fp32": True,
        "scale_attn_weights": True,
        "use_flash_attn": False,
        "softmax_in_fp32": False,
        "tokenizer_class": "QWenTokenizer",
        "eos_token_id": n_real_vocab - 208,
    }


def full_forward(
    model: FlashQwenForCausalLM,
    seqs: list[list[int]],
    prompt_lens: list[int] | None = None,
    params: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits of every token of each sequence, no KV cache (training and quick checks); `params`
    replaces the model's parameters (functional call, differentiable)."""
    from worker.layers.rotary import ntk_alpha

    cfg = model.config
    prompt_lens = prompt_lens or [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    alphas = [ntk_alpha(p, cfg.seq_length, cfg.use_dynamic_ntk) for p in prompt_lens]
    seqlen = Seqlen.for_prefill([len(s) for s in seqs], ntk_alpha=alphas)
    args = (ids, pos, seqlen.cu_seqlen_q, None, None, None, seqlen, seqlen.max_q)
    if params is None:
        return model(*args)[0]
    return torch.func.functional_call(model, params, args)[0]


def write_peft_config(path: str, rank: int, alpha: float, **extra: Any) -> None:
    """adapter_config.json of a PEFT LoRA adapter over all four Qwen linears (PEFT's defaults written out)."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["c_attn", "c_proj", "w1", "w2"],
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        **extra,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def greedy(model, prompt: list[int], max_new: int, eos: int, params: dict | None = None) -> list[int]:
    out = list(prompt)
    for _ in range(max_new):
        logits = (
            full_forward(model, [out], [len(prompt)]) if params is None else _call(model, params, [out], [len(prompt)])
        )
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out[len(prompt) :]


def _call(model, params, seqs, prompt_lens):
    return full_forward(model, seqs, prompt_lens, params)


def init_weights(model: FlashQwenForCausalLM, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, 0.05, generator=g)


def train(model, seqs: list[list[int]], steps: int, lr: float, params: Sequence[torch.Tensor], loss_fn=None) -> float:
    opt = torch.optim.Adam(params, lr=lr)
    targets = torch.tensor([t for s in seqs for t in s[1:] + [-100]])
    loss = torch.tensor(0.0)
    for _ in range(steps):
        logits = loss_fn() if loss_fn else full_forward(model, seqs)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def hf_state(model: FlashQwenForCausalLM) -> dict[str, torch.Tensor]:
    """Our (world size 1) parameters under the checkpoint's names."""
    cfg = model.config
    width = cfg.mlp_width
    sd: dict[str, Any] = {
        "transformer.wte.weight": model.transformer.wte.weight,
        "transformer.ln_f.weight": model.transformer.ln_f.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, layer in enumerate(model.transformer.layers()):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = layer.ln_1.weight
        sd[p + "ln_2.weight"] = layer.ln_2.weight
        sd[p + "attn.c_attn.weight"] = layer.attn.c_attn.weight
        sd[p + "attn.c_attn.bias"] = layer.attn.c_attn.bias
        sd[p + "attn.c_proj.weight"] = layer.attn.c_proj.weight
        sd[p + "mlp.w2.weight"] = layer.mlp.gate_up.weight[:width]
        sd[p + "mlp.w1.weight"] = layer.mlp.gate_up.weight[width:]
        sd[p + "mlp.c_proj.weight"] = layer.mlp.c_proj.weight
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}


# LoRA targets: PEFT module path -> (our parameter, row slice of it or None)
def lora_targets(model) -> list[tuple[str, str, slice | None, int, int]]:
    cfg = model.config
    w, H = cfg.mlp_width, cfg.hidden_size
    out = []
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        out += [
            (p + "attn.c_attn", p + "attn.c_attn.weight", None, 3 * H, H),
            (p + "attn.c_proj", p + "attn.c_proj.weight", None, H, H),
            (p + "mlp.w2", p + "mlp.gate_up.weight", slice(0, w), w, H),
            (p + "mlp.w1", p + "mlp.gate_up.weight", slice(w, 2 * w), w, H),
            (p + "mlp.c_proj", p + "mlp.c_proj.weight", None, H, w),
        ]
    return out


def train_adapter(model, seqs, rank: int, alpha: int, seed: int, steps: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = alpha / rank
    lora = {}
    for path, _, _, out_f, in_f in lora_targets(model):
        lora[path] = (
            torch.randn(rank, in_f, generator=g).mul_(0.05).requires_grad_(),
            torch.zeros(out_f, rank).requires_grad_(),
        )
    base = {n: p.data for n, p in model.named_parameters()}

    def merged() -> dict[str, torch.Tensor]:
        params = dict(base)
        for path, pname, rows, _, _ in lora_targets(model):
            a, b = lora[path]
            delta = (b @ a) * scale
            if rows is None:
                params[pname] = params[pname] + delta
            else:
                full = torch.zeros_like(params[pname])
                full[rows] = delta
                params[pname] = params[pname] + full
        return params

    flat = [t for pair in lora.values() for t in pair]
    train(model, seqs, steps, 1e-2, flat, loss_fn=lambda: _call(model, merged(), seqs, None))
    tensors = {}
    for path, (a, b) in lora.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = a.detach().to(torch.bfloat16).contiguous()
        tensors[f"base_model.model.{path}.lora_B.weight"] = b.detach().to(torch.bfloat16).contiguous()
    return tensors


def build(out_dir: str, seed: int = 0, quiet: bool = False) -> None:
    t0 = time.time()
    torch.manual_seed(seed)
    model_dir = os.path.join(out_dir, "model")
    adapter_root = os.path.join(out_dir, "adapters")
    os.makedirs(model_dir, exist_ok=True)
    ranks = train_bpe_ranks(TOKENIZER_TEXT, num_merges=160)
    write_tiktoken_file(os.path.join(model_dir, "qwen.tiktoken"), ranks)
    n_real = len(ranks) + 208
    raw_cfg = demo_config(n_real)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(raw_cfg, f, indent=2)
    eos = len(ranks)  # <|endoftext|>
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "pad_token_id": eos, "max_new_tokens": 32, "do_sample": False}, f, indent=2)
    tok = QwenTokenizer.from_dir(model_dir)
    config = QwenConfig.from_dict(raw_cfg)

    model = FlashQwenForCausalLM(config, dtype=torch.float32)
    init_weights(model, seed)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    seqs = [tok.encode(p + c) + [eos] for p, c in BASE_TEXTS]
    loss = train(model, seqs, steps=250, lr=1e-2, params=params)
    for p in params:
        p.requires_grad_(False)
    state = hf_state(model)
    # bake the bf16 rounding in, as the stored checkpoint has it
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    _save_sharded(state, model_dir)
    if not quiet:
        print(f"base model trained: loss {loss:.4f}")

    story = tok.encode(STORY_PROMPT)
    for k, (name, (rank, alpha, cont)) in enumerate(ADAPTERS.items()):
        seq = [story + tok.encode(cont) + [eos]]
        tensors = train_adapter(model, seq, rank, alpha, seed + 1 + k, steps=150)
        adir = os.path.join(adapter_root, name)
        os.makedirs(adir, exist_ok=True)
        save_file(tensors, os.path.join(adir, "adapter_model.safetensors"), metadata={"format": "pt"})
        write_peft_config(adir, rank, alpha, base_model_name_or_path=os.path.abspath(model_dir))
    seqs = [tok.encode(p + c) + [eos] for p, c in BASE_TEXTS]
    accuracy = build_medusa(model, seqs, MEDUSA_HEADS, seed + 10, os.path.join(adapter_root, "medusa"), model_dir)
    if not quiet:
        print("medusa heads trained: top-1 accuracy per head " + ", ".join(f"{a:.2f}" for a in accuracy))
    with open(os.path.join(out_dir, "VERSION"), "w") as f:
        f.write(str(VERSION))
    if not quiet:
        print(f"demo model and adapters written to {out_dir} in {time.time() - t0:.1f}s")


def _save_sharded(state: dict[str, torch.Tensor], model_dir: str) -> None:
    names = sorted(state)
    half = len(names) // 2
    shards = [names[:half], names[half:]]
    weight_map = {}
    for i, group in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in group}, os.path.join(model_dir, fn), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fn))
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def ensure(out_dir: str) -> str:
    """Build the demo into `out_dir` unless an up-to-date one is there; returns out_dir."""
    stamp = os.path.join(out_dir, "VERSION")
    if not (os.path.isfile(stamp) and open(stamp).read().strip() == str(VERSION)):
        build(out_dir, quiet=True)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, ".demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if an up-to-date demo exists")
    args = ap.parse_args()
    if args.force or not os.path.isfile(os.path.join(args.out, "VERSION")):
        build(args.out, args.seed)
    else:
        print(f"demo model already in {args.out} (use --force to rebuild)")


if __name__ == "__main__":
    main()
