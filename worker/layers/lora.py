"""Adapter-aware wrappers around the parallel linears: y += (x Aᵀ) Bᵀ per token, for the adapter of
the token's request, read from the ForwardContext.

Adapter weights live in fixed-shape slot pools (slot 0 = the base model, all zeros), with a part dim:
A [slots, P, r_max, in], B [slots, P, out/P, r_max] — P = 2 for the merged gate_up (w2 then w1), 1 for
the others — and each slot's true rank per part in `ranks` [P, slots] int32. A step's requests that use
adapters form segments (one per request); each module then costs two launches over all segments,
whatever the number of distinct adapters — no per-adapter loop: on CUDA the Triton kernels of
worker/kernels/lora.py, whose loops run over each slot's real rank; elsewhere (and as their reference)
two batched matmuls per part (`add_lora`).
Under TP: column layers keep A whole and B split like the base output; row layers split A on the
input dim and add (x_r A_rᵀ) Bᵀ into the partial sum before the layer's one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from worker.layers.linear import ColumnParallelLinear, RowParallelLinear


@dataclass
class AdapterBatchData:
    token_idx: torch.Tensor  # [S, L] long: token rows of each segment (padded with 0)
    valid: torch.Tensor  # [S, L] bool: real (not padding) positions
    slots: torch.Tensor  # [S] long: adapter slot of each segment (0 only for base rows of graphed decode)
    starts: torch.Tensor  # [S] int32: first token row of each segment (segments are runs of rows)
    lens: torch.Tensor  # [S] int32: tokens of each segment
    max_len: int  # host-side max of lens (the kernels' grid; no host sync)

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
        i32 = dict(device=device, dtype=torch.int32)
        return AdapterBatchData(token_idx.to(device), valid.to(device), torch.tensor(slots, device=device),
                                start_t.to(**i32), len_t.to(**i32), L)

    @staticmethod
    def for_decode(slots: torch.Tensor) -> "AdapterBatchData":
        """One segment per row of a decode batch, row i with adapter slot slots[i] (0: base, skipped by
        the kernels; exact zeros on the torch path). `slots` may be a static buffer a CUDA graph reads."""
        n, dev = slots.shape[0], slots.device
        rows = torch.arange(n, device=dev)
        return AdapterBatchData(rows[:, None], torch.ones(n, 1, dtype=torch.bool, device=dev), slots,
                                rows.to(torch.int32), torch.ones(n, dtype=torch.int32, device=dev), 1)


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


def add_lora_parts(y: torch.Tensor, x: torch.Tensor, a_pool: torch.Tensor, b_pool: torch.Tensor,
                   data: AdapterBatchData) -> None:
    """`add_lora` for each part p of a stacked pool: y[:, p·N:(p+1)·N] += B[s, p] A[s, p] x.

    y: [T, P·N]; a_pool: [slots, P, r_max, in]; b_pool: [slots, P, N, r_max]."""
    n = b_pool.shape[2]
    for p in range(a_pool.shape[1]):
        add_lora(y[:, p * n:(p + 1) * n], x, a_pool[:, p], b_pool[:, p], data)


def lora_kernels(device: torch.device, interpreter: bool = False) -> Optional[ModuleType]:
    """worker.kernels.lora on CUDA when Triton imports (on a CPU only when the process runs Triton's
    interpreter: `interpreter`), else None (the PyTorch path)."""
    if device.type != "cuda" and not interpreter:
        return None
    try:
        from worker.kernels import lora
    except ImportError:
        return None
    return lora


@dataclass
class LoraTerm:
    """The adapter term of one module: pools with a part dim, per-part slot ranks, the kernels module
    (None: PyTorch's `add_lora_parts`) and an optional side stream on which the kernels' shrink runs
    alongside the base matmul (both only read x; the expand waits for both)."""

    a_pool: torch.Tensor  # [slots, P, r_max, in]
    b_pool: torch.Tensor  # [slots, P, out / P, r_max]
    ranks: torch.Tensor  # [P, slots] int32
    kernels: Optional[ModuleType] = None
    stream: Optional[torch.cuda.Stream] = None

    def apply(self, base: Callable[[], torch.Tensor], x: torch.Tensor, data: AdapterBatchData) -> torch.Tensor:
        """base() + lora(x): y [T, out] from the base matmul, the adapter term added in place."""
        if self.kernels is None:
            y = base()
            add_lora_parts(y, x, self.a_pool, self.b_pool, data)
            return y
        k = self.kernels
        if self.stream is None:
            y = base()
            k.lora_expand(y, k.lora_shrink(x, self.a_pool, self.ranks, data), self.b_pool, self.ranks, data)
            return y
        main = torch.cuda.current_stream(x.device)
        h = k.shrink_buffer(x, self.a_pool, data)  # allocated on the main stream, which frees it after the expand
        self.stream.wait_stream(main)  # x is ready
        with torch.cuda.stream(self.stream):
            k.lora_shrink(x, self.a_pool, self.ranks, data, h)
        y = base()
        main.wait_stream(self.stream)
        k.lora_expand(y, h, self.b_pool, self.ranks, data)
        return y


class _LoraLinear(nn.Module):
    """A base linear plus its adapter term; without adapter data in the context, just the base."""

    def __init__(self, base: nn.Module, lora: LoraTerm):
        super().__init__()
        self.base = base
        self.lora = lora

    def forward(self, x: torch.Tensor, ctx: object = None) -> torch.Tensor:
        data = getattr(ctx, "adapter_data", None)
        if data is None:
            return self.base(x, ctx)
        return self.with_adapters(x, ctx, data)

    def with_adapters(self, x: torch.Tensor, ctx: object, data: AdapterBatchData) -> torch.Tensor:
        raise NotImplementedError


class LoraColumnParallelLinear(_LoraLinear):
    """A column-parallel linear plus adapters; the pool's parts cover the output columns in order
    (c_attn: one part, q|k|v; merged gate_up: w2 then w1)."""

    base: ColumnParallelLinear

    def with_adapters(self, x: torch.Tensor, ctx: object, data: AdapterBatchData) -> torch.Tensor:
        return self.lora.apply(lambda: self.base(x, ctx), x, data)  # [T, out_per_rank]


class LoraRowParallelLinear(_LoraLinear):
    """A row-parallel linear plus adapters (one part: A split on the input dim, B whole), added to this
    rank's partial sum before the layer's one all-reduce."""

    base: RowParallelLinear

    def with_adapters(self, x: torch.Tensor, ctx: object, data: AdapterBatchData) -> torch.Tensor:
        return self.base.reduce(self.lora.apply(lambda: self.base.partial(x), x, data))  # [T, out]
