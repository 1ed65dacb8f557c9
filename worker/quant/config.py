"""Which quantization a checkpoint is served with: GPTQ from its `quantization_config`, or FP8 at load.

GPTQ settings come from config.json's `quantization_config`, else from `quantize_config.json` (AutoGPTQ's
own file). Zero points: no `checkpoint_format` (or "gptq") is the v1 convention (stored zero + 1);
"gptq_v2" stores the true zero and is served as such (zero offset 0). A v2 checkpoint labelled v1 is
detected at load from its tensors (worker/layers/quantized.py) and refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from worker.config import ConfigError

QUANTIZE_CHOICES = ("auto", "none", "gptq", "fp8")


@dataclass(frozen=True)
class GPTQConfig:
    bits: int  # 4 or 8
    group_size: int  # rows per group; -1: one group over all of K
    sym: bool
    desc_act: bool  # act order: g_idx is a permutation of groups
    checkpoint_format: str = "gptq"  # "gptq" (v1 zero points) or "gptq_v2"
    source: str = ""  # the file the settings came from (for messages)

    @property
    def zero_offset(self) -> int:
        """Added to each stored zero: 1 in the v1 convention, 0 in v2."""
        return 0 if self.checkpoint_format == "gptq_v2" else 1

    @property
    def pack(self) -> int:
        """Values per int32 word."""
        return 32 // self.bits

    def groups(self, k: int) -> int:
        """G: groups along an input dim of k rows."""
        return 1 if self.group_size == -1 else -(-k // self.group_size)

    def describe(self) -> str:
        zeros = "v2 zeros" if self.zero_offset == 0 else "v1 zeros"
        return (
            f"GPTQ Int{self.bits}, group size {self.group_size}, {'sym' if self.sym else 'asym'}, "
            f"act order {'on' if self.desc_act else 'off'}, {zeros} (from {self.source})"
        )


@dataclass(frozen=True)
class FP8Config:
    """e4m3 weights quantized at load, one scale per output channel; activations scaled per token."""

    def describe(self) -> str:
        return "FP8 e4m3 weights (per-output-channel scales) quantized at load, dynamic per-token activations"


QuantConfig = GPTQConfig | FP8Config


def parse_gptq(raw: dict[str, Any], source: str) -> GPTQConfig:
    """A GPTQConfig from a quantization_config dict; ConfigError naming the key otherwise."""
    method = raw.get("quant_method", "gptq")
    if method != "gptq":
        raise ConfigError(f"{source}: quant_method {method!r} is not supported (only 'gptq'; or use --quantize fp8)")
    bits = raw.get("bits")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ConfigError(f"{source}: quantization_config bits must be 4 or 8, got {bits!r}")
    group_size = raw.get("group_size", 128)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ConfigError(
            f"{source}: quantization_config group_size must be a positive integer or -1, got {group_size!r}"
        )
    fmt = raw.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{source}: checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2')")
    for key in ("sym", "desc_act"):
        if not isinstance(raw.get(key, False), bool):
            raise ConfigError(f"{source}: quantization_config {key} must be true or false, got {raw[key]!r}")
    return GPTQConfig(
        bits=bits,
        group_size=group_size,
        sym=raw.get("sym", True),
        desc_act=raw.get("desc_act", False),
        checkpoint_format=fmt,
        source=source,
    )


def read_gptq(model_dir: str) -> GPTQConfig | None:
    """The checkpoint's GPTQ settings (config.json's quantization_config, else quantize_config.json), or None."""
    config_path = os.path.join(model_dir, "config.json")
    raw = _json(config_path) if os.path.isfile(config_path) else {}
    if isinstance(raw.get("quantization_config"), dict):
        return parse_gptq(raw["quantization_config"], f"{config_path} quantization_config")
    if "quantization_config" in raw:
        raise ConfigError(f"{config_path}: quantization_config must be an object")
    path = os.path.join(model_dir, "quantize_config.json")
    if os.path.isfile(path):
        return parse_gptq(_json(path), path)
    return None


def choose(model_dir: str, requested: str = "auto") -> QuantConfig | None:
    """The quantization to serve with: `requested` is --quantize (auto: what the checkpoint says)."""
    if requested not in QUANTIZE_CHOICES:
        raise ConfigError(f"--quantize must be one of {QUANTIZE_CHOICES}, got {requested!r}")
    gptq = read_gptq(model_dir)
    if requested == "fp8":
        if gptq is not None:
            raise ConfigError(f"--quantize fp8 needs a floating-point checkpoint; {model_dir} is {gptq.describe()}")
        return FP8Config()
    if requested == "gptq" and gptq is None:
        raise ConfigError(
            f"--quantize gptq: {model_dir} has no quantization_config in config.json and no quantize_config.json"
        )
    if requested == "none" and gptq is not None:
        raise ConfigError(f"--quantize none: {model_dir} is a quantized checkpoint ({gptq.describe()})")
    return gptq


def _json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw
