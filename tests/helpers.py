"""Shared test helpers: repo paths, a tiny Qwen v1 config, writing checkpoints to disk."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(model_type="qwen", hidden_size=64, num_attention_heads=4, kv_channels=16, num_hidden_layers=2,
            intermediate_size=192, vocab_size=256, seq_length=64, rotary_emb_base=10000, rotary_pct=1.0,
            layer_norm_epsilon=1e-6, use_dynamic_ntk=True, use_logn_attn=True, no_bias=True)


def write_checkpoint(path: str, cfg: dict, state: dict[str, torch.Tensor], n_files: int = 2) -> str:
    """Write `state` as sharded safetensors + index + config.json into `path`."""
    os.makedirs(path, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for i in range(n_files):
        group = names[i::n_files]
        fn = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in group}, os.path.join(path, fn))
        weight_map.update({n: fn for n in group})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path
