"""QwenConfig: the Qwen (v1) checkpoint configuration, both key spellings, validated.

v1.0 checkpoints (Aug 2023) spell `n_embd`/`n_head`/`n_layer`/`n_positions`/`ffn_hidden_size`; v1.1
spells `hidden_size`/`num_attention_heads`/`num_hidden_layers`/`max_position_embeddings`/
`intermediate_size`. Defaults for omitted keys differ by version (see spec/qwen-v1.md).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

# (v1.0 name, v1.1 name)
_SPELLINGS = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "num_hidden_layers": "n_layer",
    "max_position_embeddings": "n_positions",
    "intermediate_size": "ffn_hidden_size",
}
_V10_DEFAULTS = {"use_dynamic_ntk": False, "use_logn_attn": False, "layer_norm_epsilon": 1e-5, "vocab_size": 151851}
_V11_DEFAULTS = {"use_dynamic_ntk": True, "use_logn_attn": True, "layer_norm_epsilon": 1e-6, "vocab_size": 151936}


class ConfigError(ValueError):
    """A checkpoint config that cannot describe a Qwen v1 model."""


@dataclass(frozen=True)
class QwenConfig:
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int  # as in the checkpoint: TWICE the MLP width
    vocab_size: int  # rows of lm_head (padded)
    seq_length: int  # training context S: drives dynamic NTK and logn
    kv_channels: int
    padded_vocab_size: int  # rows of wte (v1.0 may differ from vocab_size)
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    layer_norm_epsilon: float = 1e-6
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    torch_dtype: str = "bfloat16"  # dtype the checkpoint asks for (bf16 when no flag is set)
    eos_token_ids: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def mlp_width(self) -> int:
        """Width of w1/w2 outputs: half of the checkpoint's intermediate_size."""
        return self.intermediate_size // 2

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def check_tokenizer(self, n_tokens: int, tokenizer_file: str) -> None:
        """Every id the tokenizer produces needs a row in wte and lm_head: refuse a smaller vocabulary at load
        (else every request fails in the sampler)."""
        rows = min(self.vocab_size, self.padded_vocab_size)
        if n_tokens > rows:
            raise ConfigError(
                f"vocab_size {rows} is smaller than the {n_tokens} tokens of {tokenizer_file}: wte and lm_head "
                "need a row for every token id"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> QwenConfig:
        model_type = raw.get("model_type", "qwen")
        if model_type != "qwen":
            raise ConfigError(
                f"unknown model_type {model_type!r}: this worker serves Qwen v1 (model_type 'qwen'); "
                "Qwen1.5/Qwen2 ('qwen2') use another layout"
            )
        is_v10 = any(old in raw for old in _SPELLINGS.values())
        defaults = _V10_DEFAULTS if is_v10 else _V11_DEFAULTS
        d: dict[str, Any] = {}
        for new, old in _SPELLINGS.items():
            if new in raw and old in raw and raw[new] != raw[old]:
                raise ConfigError(f"config sets both {new}={raw[new]} and {old}={raw[old]}")
            if new in raw:
                d[new] = raw[new]
            elif old in raw:
                d[new] = raw[old]
        missing = [
            f"{k} (or {_SPELLINGS[k]})"
            for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")
            if k not in d
        ]
        if "seq_length" not in raw:
            missing.append("seq_length")
        if missing:
            raise ConfigError(f"missing required keys: {', '.join(missing)}")
        heads, hidden = _int(d, "num_attention_heads"), _int(d, "hidden_size")
        kv_channels = _int(raw, "kv_channels", hidden // heads or 1)
        if kv_channels * heads != hidden:
            raise ConfigError(f"hidden_size ({hidden}) != kv_channels ({kv_channels}) * num_attention_heads ({heads})")
        if _int(d, "intermediate_size") % 2:
            raise ConfigError(f"intermediate_size ({d['intermediate_size']}) must be even: the MLP width is half of it")
        vocab = _int(raw, "vocab_size", int(defaults["vocab_size"]))
        base = _float(raw, "rotary_emb_base", _float(raw, "rope_theta", 10000.0))
        rotary_pct = _float(raw, "rotary_pct", 1.0)
        if not 0.0 < rotary_pct <= 1.0 or int(kv_channels * rotary_pct) % 2:
            raise ConfigError(f"rotary_pct ({rotary_pct}) must be in (0, 1] and rotate an even number of dims")
        seq_length = _int(raw, "seq_length")
        if raw.get("bf16"):
            dtype = "bfloat16"
        elif raw.get("fp16"):
            dtype = "float16"
        elif raw.get("fp32"):
            dtype = "float32"
        else:
            dtype = "bfloat16"
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < vocab for e in eos_ids):
            raise ConfigError(f"eos_token_id must be token ids in [0, vocab_size={vocab}), got {eos!r}")
        known = (
            set(_SPELLINGS)
            | set(_SPELLINGS.values())
            | {
                "vocab_size",
                "padded_vocab_size",
                "seq_length",
                "kv_channels",
                "rotary_pct",
                "rotary_emb_base",
                "rope_theta",
                "layer_norm_epsilon",
                "use_dynamic_ntk",
                "use_logn_attn",
                "no_bias",
                "tie_word_embeddings",
                "bf16",
                "fp16",
                "fp32",
                "eos_token_id",
                "model_type",
            }
        )
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_hidden_layers=_int(d, "num_hidden_layers"),
            intermediate_size=_int(d, "intermediate_size"),
            vocab_size=vocab,
            padded_vocab_size=_int(raw, "padded_vocab_size", vocab),
            seq_length=seq_length,
            kv_channels=kv_channels,
            rotary_pct=rotary_pct,
            rotary_emb_base=base,
            layer_norm_epsilon=_float(raw, "layer_norm_epsilon", defaults["layer_norm_epsilon"]),
            use_dynamic_ntk=bool(raw.get("use_dynamic_ntk", defaults["use_dynamic_ntk"])),
            use_logn_attn=bool(raw.get("use_logn_attn", defaults["use_logn_attn"])),
            no_bias=bool(raw.get("no_bias", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=_int(d, "max_position_embeddings", seq_length),
            torch_dtype=dtype,
            eos_token_ids=eos_ids,
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> QwenConfig:
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in {model_dir}")
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    """raw[key] (else `default`) as a positive integer; a ConfigError naming the key otherwise."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer() or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def _float(raw: dict[str, Any], key: str, default: float) -> float:
    """raw[key] (else `default`) as a positive finite number; a ConfigError naming the key otherwise."""
    value = raw.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")
    return float(value)
