"""P3's peer (spec/performance.md): HF transformers + PEFT mixed-adapter `generate`, same GPU, same workload.

    python scripts/bench.py --only lora --out bench_out/lora.json      # ours first (P2, P6, our P3 side)
    python scripts/bench_peer.py --ours bench_out/lora.json --out bench_out/peer.json
    python scripts/bench_peer.py --ours-tok-s 1234                     # or ours given by hand

Builds `Qwen2ForCausalLM` with random bf16 weights of the Qwen-7B shape directly on the GPU (Qwen2 with
num_key_value_heads = num_attention_heads and q/k/v biases computes Qwen v1's function; random weights
need no mapping), adds N distinct rank-16 PEFT LoRA adapters (alpha 32) on q/k/v/o/gate/up/down (= c_attn,
attn.c_proj, w2, w1, mlp.c_proj), and times `generate` of batch x prompt tokens -> new tokens with
`adapter_names` per row (PEFT's mixed-batch inference), every row its own adapter; and base-only
(adapters disabled) for reference. Tokens/s = batch x new tokens / generate wall time; the decode-only
rate comes from the difference between generating `new` tokens and 1 token.

P3 = our tokens/s on the same workload (scripts/bench.py --lora: an eager prefill with adapters and
graphed adapter decode steps, key lora.generate) / the peer's. Both end to end (prefill + decode) and
decode only. Run both on the same card (the JSON's card is checked). Prints a table last, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_common import SHAPES  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_peer(shape: str, device: torch.device):
    """Qwen2ForCausalLM of the Qwen v1 shape (MHA, q/k/v biases), random bf16 weights on `device`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    s = SHAPES[shape]
    config = Qwen2Config(
        vocab_size=s["vocab_size"],
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"] // 2,  # Qwen v1's intermediate_size is 2x the width
        num_hidden_layers=s["num_hidden_layers"],
        num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_attention_heads"],
        max_position_embeddings=s["seq_length"],
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    return model


def add_adapters(model, n: int, rank: int, alpha: float, dtype: str):
    """n distinct random LoRA adapters a0..a{n-1} on the seven projections (PEFT's own adapter dtype
    handling unless dtype == 'bf16')."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=TARGETS,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )  # False: random A and B (not zero B)
    peft_model = get_peft_model(model, cfg, adapter_name="a0")
    for i in range(1, n):
        peft_model.add_adapter(f"a{i}", cfg)
    if dtype == "bf16":
        peft_model.to(torch.bfloat16)
    peft_model.eval()
    return peft_model


def timed_generate(model, ids: torch.Tensor, new: int, adapter_names=None) -> float:
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
    )
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    sync(ids.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**kwargs)
    sync(ids.device)
    assert out.shape == (ids.shape[0], ids.shape[1] + new), out.shape
    return time.perf_counter() - t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, ids: torch.Tensor, new: int, names, repeats: int) -> dict:
    timed_generate(model, ids, 2, names)  # warm-up
    full = min(timed_generate(model, ids, new, names) for _ in range(repeats))
    one = min(timed_generate(model, ids, 1, names) for _ in range(repeats))
    B = ids.shape[0]
    return dict(
        generate_s=full,
        first_token_s=one,
        tok_s=B * new / full,
        decode_tok_s=B * (new - 1) / max(full - one, 1e-9),
        step_ms=(full - one) / (new - 1) * 1e3,
    )


def peer_generate(shape: str, batch: int, prompt: int, new: int, rank: int, steps: int) -> dict[str, Any]:
    """HF transformers + PEFT mixed-adapter `generate` (scripts/bench_peer.py's model and adapters; row i on
    adapter i), extrapolated: its decode step at this batch is ~1.3 s, so it times generate of 1 token
    (prefill) and of 1 + `steps` tokens, and estimates new tokens as t(1) + (new - 1) * step."""
    dev = torch.device("cuda")
    t0 = time.time()
    model = add_adapters(build_peer(shape, dev), batch, rank, 2.0 * rank, "peft")
    build_s = time.time() - t0
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(1, 1000, (batch, prompt), generator=g, device=dev)
    names = [f"a{i}" for i in range(batch)]
    timed_generate(model, ids, 2, names)  # warm-up
    one = timed_generate(model, ids, 1, names)
    more = timed_generate(model, ids, 1 + steps, names)
    step = (more - one) / steps
    est = one + (new - 1) * step
    del model
    torch.cuda.empty_cache()
    return dict(
        method=f"extrapolated: t(1 token) + {new - 1} x the mean of {steps} decode steps (t(1+{steps}) - t(1))",
        build_s=build_s,
        prefill_s=one,
        step_ms=step * 1e3,
        generate_s=est,
        tok_s=batch * new / est,
        decode_tok_s=batch / step,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32, help="distinct adapters (row i uses adapter i mod N)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument(
        "--adapter-dtype",
        default="peft",
        choices=["peft", "bf16"],
        help="peft: PEFT's default (adapter weights upcast to fp32 on a bf16 model); bf16: cast down",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-base", action="store_true", help="skip the base-only (adapters disabled) run")
    ap.add_argument("--ours", default="", help="bench.py --lora JSON (key lora.generate)")
    ap.add_argument("--ours-tok-s", type=float, default=0.0, help="our end-to-end tokens/s, if no JSON")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench_out", "peer.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_peer.py needs a CUDA GPU (or --device cpu for a smoke run)")
    import peft
    import transformers

    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    res: dict = dict(
        card=card,
        date=time.strftime("%Y-%m-%d"),
        shape=args.shape,
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        batch=args.batch,
        adapters=args.adapters,
        prompt=args.prompt,
        new_tokens=args.new,
        rank=args.rank,
        alpha=args.alpha,
        adapter_dtype=args.adapter_dtype,
        command=" ".join(sys.argv),
    )
    t0 = time.time()
    model = add_adapters(build_peer(args.shape, dev), args.adapters, args.rank, args.alpha, args.adapter_dtype)
    res["build_s"] = time.time() - t0
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(1, SHAPES[args.shape]["vocab_size"] - 1, (args.batch, args.prompt), generator=g, device=dev)
    names = [f"a{i % args.adapters}" for i in range(args.batch)]
    res["mixed"] = measure(model, ids, args.new, names, args.repeats)
    if not args.no_base:
        with model.disable_adapter():
            res["base"] = measure(model, ids, args.new, None, args.repeats)
    ours = None
    if args.ours:
        with open(args.ours) as f:
            ours_json = json.load(f)
        ours = ours_json["lora"]["generate"]
        res["ours_card"] = ours_json.get("card")
        if ours_json.get("card") != card:
            print(f"warning: ours ran on {ours_json.get('card')}, the peer on {card}: the ratio compares cards")
    elif args.ours_tok_s:
        ours = dict(tok_s=args.ours_tok_s, decode_tok_s=None)
    if ours is not None:
        res["ours"] = ours
        res["P3"] = ours["tok_s"] / res["mixed"]["tok_s"]
        if ours.get("decode_tok_s"):
            res["P3_decode"] = ours["decode_tok_s"] / res["mixed"]["decode_tok_s"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print_table(res)


def print_table(res: dict) -> None:
    m = res["mixed"]
    print(
        f"\n{res['card']} | {res['shape']} bf16 | transformers {res['transformers']}, peft {res['peft']} | batch "
        f"{res['batch']} x {res['prompt']} prompt tokens -> {res['new_tokens']} new | {res['adapters']} distinct "
        f"rank-{res['rank']} adapters (adapter dtype: {res['adapter_dtype']})"
    )
    print("| id | figure | measured | target |\n|---|---|---|---|")
    print(
        f"| | peer HF+PEFT mixed adapters: generate {m['generate_s']:.2f} s (first token {m['first_token_s']:.2f} s, "
        f"step {m['step_ms']:.0f} ms) | {m['tok_s']:.1f} tok/s (decode {m['decode_tok_s']:.1f}) | |"
    )
    if "base" in res:
        b = res["base"]
        print(
            f"| | peer HF base only: generate {b['generate_s']:.2f} s (step {b['step_ms']:.0f} ms) | "
            f"{b['tok_s']:.1f} tok/s (decode {b['decode_tok_s']:.1f}) | |"
        )
    if "P3" in res:
        o = res["ours"]
        decode = f", decode only {res['P3_decode']:.0f}x" if "P3_decode" in res else ""
        print(
            f"| P3 | ours {o['tok_s']:.0f} tok/s / peer {m['tok_s']:.1f} tok/s (same workload) | "
            f"{res['P3']:.0f}x{decode} | >= 100x |"
        )


if __name__ == "__main__":
    main()
