"""The LoRA TP cut rules: which slice of an adapter's A and B each rank keeps (worker/adapters/slots.py fills
its pool with them).

A column-parallel linear keeps A whole and cuts B by output rows within each packed block (c_attn: q, k, v each by
heads); a row-parallel one cuts A by input columns, keeps B whole, and adds (x_r A_rᵀ) Bᵀ into its partial sum
before the layer's one all-reduce (worker/layers/lora.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from worker.weights import shard_packed, shard_tensor


def cut_column_lora(
    a: torch.Tensor, b: torch.Tensor, blocks: Sequence[int], rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-parallel: A [r, in] whole; B [sum(blocks), r] cut by output rows within each packed block,
    like the base weight (q, k, v of c_attn each by heads)."""
    return a, shard_packed(b, 0, blocks, rank, world_size, "lora_B")


def cut_row_lora(a: torch.Tensor, b: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-parallel: A [r, in] cut by input columns, like the base weight; B [out, r] whole."""
    return shard_tensor(a, 1, rank, world_size, "lora_A"), b


@dataclass(frozen=True)
class LoraPart:
    """One adapter module of a wrapped linear (A [r, d_in], B [d_out, r], full sizes) and its TP cut."""

    row: bool  # the base is row-parallel (else column-parallel)
    d_in: int
    blocks: tuple[int, ...]  # the base's packed output blocks that B covers, in order (c_attn: q, k, v)

    @property
    def d_out(self) -> int:
        return sum(self.blocks)

    def shard_dims(self, world_size: int) -> tuple[int, int]:
        """(in, out) of one rank's shard."""
        return (self.d_in // world_size, self.d_out) if self.row else (self.d_in, self.d_out // world_size)

    def cut(self, a: torch.Tensor, b: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A, B)."""
        if self.row:
            return cut_row_lora(a, b, rank, world_size)
        return cut_column_lora(a, b, self.blocks, rank, world_size)


def lora_parts(base: nn.Module, n: int) -> list[LoraPart]:
    """The `n` adapter modules of a base linear, in output order: a column-parallel base's packed blocks
    shared evenly among them (c_attn: one over q|k|v; gate_up: w2, w1); a row-parallel base has one."""
    if isinstance(base, RowParallelLinear) and n == 1:
        return [LoraPart(True, base.in_features * base.pctx.world_size, (base.out_features,))]
    if isinstance(base, ColumnParallelLinear) and n > 0 and len(base.packed_sizes_total) % n == 0:
        k = len(base.packed_sizes_total) // n
        return [
            LoraPart(False, base.in_features, tuple(base.packed_sizes_total[p * k : (p + 1) * k])) for p in range(n)
        ]
    raise ValueError(f"cannot split {type(base).__name__} into {n} LoRA parts")
