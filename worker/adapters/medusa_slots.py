"""Medusa heads that ride on adapter pool slots: a row's slot picks its heads (Medusa-only v2 or joint
LoRA + Medusa adapters), so the heads are attached and forgotten with the slot.

One head count holds across the speculator and every Medusa adapter, offloaded ones included (else
loading an offloaded one back would not fit beside the others).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from worker.adapters.medusa import adapter_heads
from worker.adapters.peft import adapter_dir
from worker.layers.medusa import MedusaCheckpoint
from worker.models.qwen import FlashQwenForCausalLM


@dataclass
class MedusaSlots:
    """The pool's view of the model's per-slot Medusa heads; adapter ids resolve under `root`."""

    root: str
    model: FlashQwenForCausalLM

    def read(self, params: Any, source: int, known: Iterable[MedusaCheckpoint | None]) -> MedusaCheckpoint | None:
        """The heads adapter `params` (pb.AdapterParameters) brings, or None; validated to ride on requests
        beside the speculator and `known` (the heads of every adapter index held, offloaded ones included)."""
        num_heads = self.model.medusa_heads or next((c.num_heads for c in known if c is not None), 0)
        paths = [adapter_dir(self.root, i, source) for i in params.adapter_ids]
        return adapter_heads(self.root, paths, self.model.config, num_heads)

    def attach(self, ckpt: MedusaCheckpoint | None, slot: int) -> None:
        """Rows on `slot` draft with `ckpt`'s heads (none: an adapter without heads)."""
        if ckpt is not None:
            self.model.attach_medusa(ckpt, slot)

    def detach(self, slot: int) -> None:
        """Forget the heads of a slot being freed, so its next adapter does not inherit them."""
        self.model.medusa.detach(slot)
