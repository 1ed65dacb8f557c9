"""Random Qwen v1 test weights (HF names) and random PEFT LoRA adapters, with non-degenerate scales:
the inputs the tests feed to both the worker and the float64 reference (tests/reference.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from reference import ref_config


def _shapes(c: dict) -> dict[str, tuple[int, ...]]:
    H, M = c["hidden_size"], c["mlp_width"]
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (c["padded_vocab_size"], H)}
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (H,),
                p + "attn.c_attn.weight": (3 * H, H),
                p + "attn.c_attn.bias": (3 * H,),
                p + "attn.c_proj.weight": (H, H),
                p + "ln_2.weight": (H,),
                p + "mlp.w1.weight": (M, H),
                p + "mlp.w2.weight": (M, H),
                p + "mlp.c_proj.weight": (H, M),
            }
        )
    shapes["transformer.ln_f.weight"] = (H,)
    shapes["lm_head.weight"] = (c["vocab_size"], H)
    return shapes


def random_checkpoint(cfg: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Random Qwen v1 weights (HF names) with non-degenerate scales.

    Norm weights ``1 + 0.1*N(0,1)``; embeddings ``N(0, 1)``; linear weights
    ``N(0, gain^2/fan_in)`` (gain 1.0 for c_attn/w1/w2/lm_head, 0.5 for the two c_proj);
    c_attn bias ``N(0, 0.1^2)``. wte has ``padded_vocab_size`` rows, lm_head ``vocab_size``.
    Deterministic for a given seed (generated in float32, then cast to ``dtype``).
    """
    c = ref_config(cfg)
    g = torch.Generator().manual_seed(int(seed))
    gains = {"attn.c_attn": 1.0, "attn.c_proj": 0.5, "mlp.w1": 1.0, "mlp.w2": 1.0, "mlp.c_proj": 0.5, "lm_head": 1.0}
    out: dict[str, Tensor] = {}
    for name, shape in _shapes(c).items():
        z = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * z
        elif name == "transformer.wte.weight":
            t = z
        elif name.endswith(".bias"):
            t = 0.1 * z
        else:
            mod = name.rsplit(".", 1)[0]
            gain = next(v for k, v in gains.items() if mod.endswith(k))
            t = z * (gain / math.sqrt(shape[1]))
        out[name] = t.to(dtype)
    return out


def random_lora(
    cfg: dict,
    rank: int,
    alpha: float,
    seed: int,
    targets: Sequence[str] = ("c_attn", "attn.c_proj", "mlp.c_proj", "w1", "w2"),
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, Tensor], dict]:
    """Random PEFT LoRA adapter (nonzero A and B) in PEFT key layout.

    ``targets`` entries are matched as module-path suffixes: ``"c_attn"``,
    ``"attn.c_proj"``, ``"mlp.c_proj"``, ``"w1"``, ``"w2"``, and ``"c_proj"`` (both
    c_proj modules, as the official script does). Shapes: A ``[r, in]``, B ``[out, r]``.
    A ~ N(0, 1/in), B ~ N(0, 0.5^2/r) so the merged delta is comparable to the base weights.
    Returns ``(tensors, adapter_config_dict)``.
    """
    c = ref_config(cfg)
    H, M = c["hidden_size"], c["mlp_width"]
    io = {"attn.c_attn": (H, 3 * H), "attn.c_proj": (H, H), "mlp.w1": (H, M), "mlp.w2": (H, M), "mlp.c_proj": (M, H)}
    g = torch.Generator().manual_seed(int(seed))
    tensors: dict[str, Tensor] = {}
    for i in range(c["num_hidden_layers"]):
        for mod, (fin, fout) in io.items():
            if not any(mod == t or mod.endswith("." + t) for t in targets):
                continue
            p = f"base_model.model.transformer.h.{i}.{mod}."
            tensors[p + "lora_A.weight"] = (torch.randn(rank, fin, generator=g) / math.sqrt(fin)).to(dtype)
            tensors[p + "lora_B.weight"] = (torch.randn(fout, rank, generator=g) * (0.5 / math.sqrt(rank))).to(dtype)
    if not tensors:
        raise ValueError(f"targets {targets!r} matched no module")
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(rank),
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "use_rslora": bool(use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "base_model_name_or_path": "random-qwen-v1",
    }
    return tensors, adapter_cfg
