"""What the router needs from a Qwen v1 `config.json` (plain Python): the training context
`seq_length` and `use_dynamic_ntk`, which fix each prompt's NTK alpha and so the prefix cache's keys.

Defaults follow worker/config.py (spec/qwen-v1.md): a v1.0 config (spelling `n_embd`, `n_head`, ...)
leaves dynamic NTK off, a v1.1 config leaves it on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

_V10_KEYS = ("n_embd", "n_head", "n_layer", "n_positions", "ffn_hidden_size")


@dataclass(frozen=True)
class ModelFacts:
    seq_length: int
    use_dynamic_ntk: bool


def read_model_facts(model_dir: str) -> ModelFacts:
    """ModelFacts from `model_dir/config.json`; ValueError naming the file when they are missing or bad."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the model's {path}: {err}") from None
    seq_length = raw.get("seq_length") if isinstance(raw, dict) else None
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"{path}: seq_length must be a positive integer, got {seq_length!r}")
    default_ntk = not any(k in raw for k in _V10_KEYS)
    return ModelFacts(seq_length, bool(raw.get("use_dynamic_ntk", default_ntk)))
