"""Medusa heads (speculative decoding): K extra next-next-token predictors on the final hidden state.

Head i is `num_layers` residual blocks r <- r + SiLU(W_ij r + b_ij) starting from r = h. v2 (one block,
no projection of its own) runs [h, r_1..r_K] through the base LM head once; v1 projects each r_i through
its own vocab projection `{i}.{num_layers}.weight`. Sharding: W_ij and b_ij are column parallel (rank r
holds rows [r*H/n, (r+1)*H/n)), the block output all-gathered before the residual add; v1's projection
is vocab parallel and gathered like the LM head.

`MedusaSet` holds the base speculator (loaded at start) and the heads of adapter pool slots (per-request
v2 adapters, joint LoRA + Medusa adapters): each row of a batch uses its slot's heads, else the base's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from worker.distributed import ParallelContext
from worker.weights import shard_tensor

LMHead = Callable[[torch.Tensor], torch.Tensor]  # [..., H] -> [..., V], gathered over vocab shards


@dataclass
class MedusaCheckpoint:
    """A validated Medusa checkpoint, whole (unsharded) on the host: what worker/adapters/medusa.py reads."""

    path: str  # the file the tensors came from (for messages and logs)
    version: int  # 1: per-head vocab projection; 2: one block, the base LM head
    num_heads: int  # K
    num_layers: int  # residual blocks per head
    weights: torch.Tensor  # [K, L, H, H]: W_ij (out, in)
    biases: torch.Tensor  # [K, L, H]
    projections: torch.Tensor | None  # [K, V, H] (v1 only)

    def describe(self) -> str:
        return f"Medusa v{self.version}: {self.num_heads} heads of {self.num_layers} layers ({self.path})"


class MedusaHeads(nn.Module):
    """One checkpoint's heads, this rank's shard: W [L, K, H/n, H], b [L, K, H/n] (block-major: the first
    block of every head is one GEMM, as all read h), v1 projection [K, V/n, H]."""

    def __init__(self, ckpt: MedusaCheckpoint, pctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.pctx = pctx
        self.version = ckpt.version
        self.num_heads = ckpt.num_heads
        self.num_layers = ckpt.num_layers
        rank, world = pctx.rank, pctx.world_size

        def cut(t: torch.Tensor, dim: int, what: str) -> torch.Tensor:
            return shard_tensor(t, dim, rank, world, what).to(pctx.device, dtype)

        self.weight = cut(ckpt.weights, 2, "Medusa hidden size").transpose(0, 1).contiguous()
        self.bias = cut(ckpt.biases, 2, "Medusa hidden size").transpose(0, 1).contiguous()
        self.proj = None if ckpt.projections is None else cut(ckpt.projections, 1, "Medusa vocab").contiguous()

    def residuals(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, H] -> r [N, K, H]: each head's residual blocks (the all-gather before each residual add)."""
        N, H = h.shape
        y = (h @ self.weight[0].view(-1, H).T).view(N, self.num_heads, -1) + self.bias[0]  # [N, K, H/n]
        r = h.unsqueeze(1) + self.pctx.all_gather_last_dim(nn.functional.silu(y))
        for j in range(1, self.num_layers):
            y = torch.einsum("nkh,koh->nko", r, self.weight[j]) + self.bias[j]
            r = r + self.pctx.all_gather_last_dim(nn.functional.silu(y))
        return r

    def project(self, r: torch.Tensor) -> torch.Tensor:
        """v1: r [N, K, H] -> speculative logits [N, K, V] through each head's own projection (gathered)."""
        assert self.proj is not None
        return self.pctx.all_gather_last_dim(torch.einsum("nkh,kvh->nkv", r, self.proj))


class MedusaSet(nn.Module):
    """The base speculator and the heads of adapter slots. Every attached head set has the same K
    (`num_heads`, 0 when none): the base's when one is loaded, else the first slot's."""

    def __init__(self) -> None:
        super().__init__()
        self.base: MedusaHeads | None = None
        self.slots: dict[int, MedusaHeads] = {}  # adapter pool slot -> its heads (v2 only)

    @property
    def num_heads(self) -> int:
        if self.base is not None:
            return self.base.num_heads
        return next(iter(self.slots.values())).num_heads if self.slots else 0

    def attach(self, heads: MedusaHeads, slot: int | None = None) -> None:
        """The base speculator (slot None) or the heads of adapter pool slot `slot`. Raises ValueError for a
        K other than the attached heads' or for a v1 head on a slot (callers check first, with the file)."""
        others = [h for s, h in self.slots.items() if s != slot]
        if slot is not None and self.base is not None:
            others.append(self.base)
        if others and others[0].num_heads != heads.num_heads:
            raise ValueError(f"{heads.num_heads} Medusa heads where the attached ones have {others[0].num_heads}")
        if slot is None:
            self.base = heads
        elif heads.version != 2:
            raise ValueError("per-adapter Medusa heads must be v2 (they share the base LM head)")
        else:
            self.slots[slot] = heads

    def detach(self, slot: int) -> None:
        """Forget slot `slot`'s heads (its adapter was evicted or offloaded); nothing if it had none."""
        self.slots.pop(slot, None)

    def heads_of(self, slot: int) -> MedusaHeads | None:
        return self.slots.get(slot, self.base)

    def rows(self, adapter_slots: Sequence[int]) -> list[bool]:
        """Which rows have Medusa heads (their slot's or the base speculator)."""
        return [self.heads_of(s) is not None for s in adapter_slots]

    def forward(
        self, hidden: torch.Tensor, lm_head: LMHead, adapter_slots: Sequence[int] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [N, H] -> (logits [N, V], speculative logits [N, K, V] or None when no head is attached).
        Rows without heads get r_i = h (their speculative logits repeat the logits: not drafts). Rows are
        grouped by head set on the host (`adapter_slots` is a list), identically on every rank; when one
        head set serves every row nothing is gathered or copied from the host (CUDA-graph capturable)."""
        K, N = self.num_heads, hidden.shape[0]
        if K == 0:
            return lm_head(hidden), None
        groups = _groups(self, [0] * N if adapter_slots is None else list(adapter_slots))
        v1, v2 = [], []
        for heads, rows in groups:
            idx: slice | torch.Tensor = slice(None) if len(rows) == N else torch.tensor(rows, device=hidden.device)
            r = heads.residuals(hidden[idx])  # [n, K, H]
            if heads.version == 1:
                v1.append((idx, heads.project(r)))  # [n, K, V]
            else:
                v2.append((idx, r))
        if v2:  # one LM head call over [h, r_1..r_K] of every row
            stacked = hidden.unsqueeze(1).repeat(1, K + 1, 1)  # [N, K+1, H]
            for idx, r in v2:
                stacked[idx, 1:] = r
            both = lm_head(stacked)  # [N, K+1, V]
            logits, speculative = both[:, 0].contiguous(), both[:, 1:]  # logits as the sampler's usual input
        else:
            logits = lm_head(hidden)  # [N, V]
            if len(v1) == 1 and isinstance(v1[0][0], slice):
                return logits, v1[0][1]
            speculative = logits.unsqueeze(1).repeat(1, K, 1)
        for idx, spec in v1:
            speculative[idx] = spec
        return logits, speculative


def _groups(medusa: MedusaSet, slots: list[int]) -> list[tuple[MedusaHeads, list[int]]]:
    """(heads, row indices) per distinct head set in `slots`, in order of first use."""
    out: dict[int, tuple[MedusaHeads, list[int]]] = {}
    for row, slot in enumerate(slots):
        heads = medusa.heads_of(slot)
        if heads is not None:
            out.setdefault(id(heads), (heads, []))[1].append(row)
    return list(out.values())
