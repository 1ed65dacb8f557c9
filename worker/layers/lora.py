"""Adapter-aware wrappers around the parallel linears: y += (x Aᵀ) Bᵀ per token, for the adapter of
the token's request, read from the ForwardContext.

Adapter weights live in fixed-shape slot pools (slot 0 = the base model, all zeros). A step's
requests that use adapters form segments (one per request); each module then costs two batched
matmuls over [segments, tokens, …], whatever the number of distinct adapters — no per-adapter loop.
Under TP: column layers keep A whole and B split like the base output; row layers split A on the
input dim and add (x_r A_rᵀ) Bᵀ into the partial sum before the layer's one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from worker.layers.linear import ColumnParallelLinear, RowParallelLinear


@dataclass
class AdapterBatchData:
    token_idx: torch.Tensor  # [S, L] long: token rows of each segment (padded with 0)
    valid: torch.Tensor  # [S, L] bool: real (not padding) positions
    slots: torch.Tensor  # [S] long: adapter slot of each segment (never 0)

    @staticmethod
    def build(slot_per_request: Sequence[int], tokens_per_request: Sequence[int],
              device: torch.device | str) -> Optional["AdapterBatchData"]:
        """Segments for the requests whose slot is not 0; None when the step uses no adapter."""
        starts, lens, slots = [], [], []
        offset = 0
        for slot, n in zip(slot_per_request, tokens_per_request):
            if slot:
                starts.append(offset)
                lens.append(n)
                slots.append(slot)
            offset += n
        if not slots:
            return None
        L = max(lens)
        ar = torch.arange(L)
        start_t, len_t = torch.tensor(starts), torch.tensor(lens)
        valid = ar[None, :] < len_t[:, None]
        token_idx = torch.where(valid, start_t[:, None] + ar[None, :], torch.zeros_like(ar)[None, :])
        return AdapterBatchData(token_idx.to(device), valid.to(device), torch.tensor(slots, device=device))


def add_lora(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
             data: AdapterBatchData) -> None:
    """y[t] += B[s] A[s] x[t] for every token t of a segment with slot s, in place.

    y: [T, out] (may be a column slice of a wider output); x: [T, in];
    a_pool: [slots, r_max, in]; b_pool: [slots, out, r_max].
    """
    xs = x[data.token_idx] * data.valid[..., None].to(x.dtype)  # [S, L, in]; padding rows are zero
    h = torch.bmm(xs, a_pool[data.slots].transpose(1, 2))  # [S, L, r_max]
    delta = torch.bmm(h, b_pool[data.slots].transpose(1, 2))  # [S, L, out]; zero on padding rows
    # no boolean indexing (a host sync, which CUDA-graph capture forbids): padding rows add exact zeros
    y.index_add_(0, data.token_idx.flatten(), delta.reshape(-1, delta.shape[-1]).to(y.dtype))


class LoraColumnParallelLinear(nn.Module):
    """A column-parallel linear plus adapters; `parts` map output column ranges to slot pools
    (c_attn: one part; merged gate_up: w2 then w1)."""

    def __init__(self, base: ColumnParallelLinear, parts: Sequence[tuple[slice, torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.base = base
        self.parts = list(parts)

    def forward(self, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        y = self.base(x, ctx)
        data = getattr(ctx, "adapter_data", None)
        if data is not None:
            for cols, a_pool, b_pool in self.parts:
                add_lora(y[:, cols], x, a_pool, b_pool, data)
        return y


class LoraRowParallelLinear(nn.Module):
    def __init__(self, base: RowParallelLinear, a_pool: torch.Tensor, b_pool: torch.Tensor):
        super().__init__()
        self.base = base
        self.a_pool = a_pool
        self.b_pool = b_pool

    def forward(self, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        y = self.base.partial(x)  # [T, out]: this rank's share
        data = getattr(ctx, "adapter_data", None)
        if data is not None:
            add_lora(y, x, self.a_pool, self.b_pool, data)
        return self.base.reduce(y)
