"""Write a GPTQ checkpoint (AutoGPTQ layout, v1 zero points) of a float Qwen v1 checkpoint.

    python scripts/quantize.py SRC DST [--bits 4|8] [--group-size 128] [--asym] [--act-order]
                               [--method rtn|gptq] [--calib-text FILE] [--damp 0.01]

rtn rounds each group to nearest (act order then groups rows by decreasing input-column norm of W, a
stand-in for the Hessian diagonal). gptq runs the GPTQ algorithm with Hessians from the float model's
inputs to each linear on the calibration text (default: the demo model's texts), all layers from one float
pass (not layer-by-layer sequential). DST gets the quantized tensors, config.json with quantization_config,
quantize_config.json, and every non-weight file of SRC (tokenizer, generation config).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from worker.quant.checkpoint import Quantizer, quantization_config, quantize_state  # noqa: E402
from worker.quant.gptq_format import Quantized  # noqa: E402
from worker.quant.gptq_solver import Hessian, gptq_quantize  # noqa: E402


def read_state(model_dir: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for fn in sorted(os.listdir(model_dir)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, fn), framework="pt") as f:
                for name in f.keys():
                    state[name] = f.get_tensor(name)
    if not state:
        raise SystemExit(f"no *.safetensors in {model_dir}")
    if any(n.endswith(".qweight") for n in state):
        raise SystemExit(f"{model_dir} is already quantized")
    return state


def calibration_hessians(model_dir: str, texts: list[str]) -> dict[str, Hessian]:
    """H of the input of each quantized linear ("transformer.h.{i}.{module}"), from the float model (fp32,
    CPU) run on `texts`: forward hooks on its layers record each linear's inputs."""
    from make_demo_model import full_forward
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.tokenizer import QwenTokenizer

    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False, quantize="none")
    tok = QwenTokenizer.from_dir(model_dir)
    hessians: dict[str, Hessian] = {}
    handles = []
    for i, layer in enumerate(model.transformer.layers()):
        for attr, names in (
            (layer.attn.c_attn, ("attn.c_attn",)),
            (layer.attn.c_proj, ("attn.c_proj",)),
            (layer.mlp.gate_up, ("mlp.w2", "mlp.w1")),  # one input, one Hessian for both
            (layer.mlp.c_proj, ("mlp.c_proj",)),
        ):
            h = Hessian(attr.in_features)
            for nm in names:
                hessians[f"transformer.h.{i}.{nm}"] = h
            handles.append(attr.register_forward_hook(lambda _m, inp, _out, h=h: h.add(inp[0].detach())))
    with torch.no_grad():
        for text in texts:
            ids = tok.encode(text)
            if ids:
                full_forward(model, [ids])
    for handle in handles:
        handle.remove()
    return hessians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--group-size", type=int, default=128, help="rows per group; -1: one group per column")
    ap.add_argument("--asym", action="store_true", help="asymmetric zero points (default: sym, as Qwen's releases)")
    ap.add_argument("--act-order", action="store_true", help="desc_act: quantize rows by decreasing importance")
    ap.add_argument("--method", choices=["rtn", "gptq"], default="gptq")
    ap.add_argument("--calib-text", default=None, help="a text file, one calibration sample per paragraph")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening: fraction of the mean H diagonal")
    args = ap.parse_args()
    t0 = time.time()
    state = read_state(args.src)
    sym = not args.asym
    quantizer: Quantizer | None = None
    if args.method == "gptq":
        if args.calib_text:
            with open(args.calib_text) as f:
                texts = [p.strip() for p in f.read().split("\n\n") if p.strip()]
        else:
            from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT

            texts = [p + c for p, c in BASE_TEXTS] + [STORY_PROMPT + c for _, _, c in ADAPTERS.values()]
        hessians = calibration_hessians(args.src, texts)

        def gptq(w: torch.Tensor, prefix: str) -> Quantized:
            return gptq_quantize(w, hessians[prefix].h, args.bits, args.group_size, sym, args.act_order, args.damp)

        quantizer = gptq

    def norm_order(prefix: str, k: int) -> torch.Tensor | None:
        if not args.act_order:
            return None
        w = state[f"{prefix}.weight"].float()
        if prefix.endswith("mlp.w1"):  # gate and up share their input: one order for both
            w = state[prefix.replace("mlp.w1", "mlp.w2") + ".weight"].float()
        return torch.argsort(w.norm(dim=0), descending=True)

    q = quantize_state(state, args.bits, args.group_size, sym, norm_order, quantizer)
    os.makedirs(args.dst, exist_ok=True)
    for fn in os.listdir(args.src):
        if not fn.endswith(".safetensors") and fn not in ("model.safetensors.index.json", "config.json"):
            path = os.path.join(args.src, fn)
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(args.dst, fn))
    save_file({k: v.contiguous() for k, v in q.items()}, os.path.join(args.dst, "model.safetensors"), {"format": "pt"})
    qc = quantization_config(args.bits, args.group_size, sym, args.act_order)
    with open(os.path.join(args.src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(args.dst, "config.json"), "w") as f:
        json.dump({**cfg, "quantization_config": qc}, f, indent=2)
    with open(os.path.join(args.dst, "quantize_config.json"), "w") as f:
        json.dump({k: v for k, v in qc.items() if k != "quant_method"}, f, indent=2)
    print(
        f"{args.method} Int{args.bits} (group {args.group_size}, {'sym' if sym else 'asym'}, act order "
        f"{'on' if args.act_order else 'off'}) written to {args.dst} in {time.time() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
