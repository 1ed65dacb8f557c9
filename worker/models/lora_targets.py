"""The linears of a Qwen block that a LoRA adapter may wrap, and the PEFT modules each one packs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

# The layer attribute each adapter wraps -> the PEFT modules it packs, in output order
# (w2 is the gate, so it comes first in gate_up).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attn.c_attn": ("attn.c_attn",),
    "attn.c_proj": ("attn.c_proj",),
    "mlp.gate_up": ("mlp.w2", "mlp.w1"),
    "mlp.c_proj": ("mlp.c_proj",),
}

# Targets whose B may sit beside the base weight as extra input columns ("K lanes", worker/adapters/slots.py
# `joint_layout`), their h = x·Aᵀ written into those lanes by the kernel that writes x (mlp.c_proj's: the gate|up
# activation), so the base GEMM adds the term itself. c_attn's (h from ln_1's kernel) measured no faster on the H200:
# its GEMM over 528 lanes took 4 us a layer more than the base (BENCHMARKS.md, 2026-11-30).
LANE_TARGETS = ("mlp.c_proj",)


@dataclass
class LoraTarget:
    """One wrappable linear: `getattr(owner, attr)` is the layer; setattr replaces it with its LoRA wrapper."""

    layer: int  # decoder layer index
    key: str  # LORA_TARGETS key, e.g. "mlp.gate_up"
    modules: tuple[str, ...]  # PEFT module names it packs, in output order
    owner: nn.Module
    attr: str


def lora_targets(layers: Iterable[nn.Module]) -> list[LoraTarget]:
    """Every linear an adapter may wrap, layer by layer in LORA_TARGETS order."""
    out = []
    for i, layer in enumerate(layers):
        for key, modules in LORA_TARGETS.items():
            owner, attr = key.split(".")
            out.append(LoraTarget(layer=i, key=key, modules=modules, owner=getattr(layer, owner), attr=attr))
    return out
