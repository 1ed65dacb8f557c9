"""Vocab-parallel embedding (all-reduce) and LM head (all-gather of logits).

Rank r holds rows [r*V/n, (r+1)*V/n) of `wte` / `lm_head`.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.distributed import ParallelContext
from worker.weights import Weights, shard_range


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings_total: int, hidden: int, pctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.pctx = pctx
        self.num_embeddings_total = num_embeddings_total
        self.start, self.stop = shard_range(num_embeddings_total, pctx.rank, pctx.world_size, "vocab")
        self.weight = nn.Parameter(
            torch.empty(self.stop - self.start, hidden, dtype=dtype, device=pctx.device), requires_grad=False
        )

    def load(self, weights: Weights, name: str) -> None:
        self.weight.data.copy_(
            weights.get_sharded(
                f"{name}.weight",
                0,
                self.pctx.rank,
                self.pctx.world_size,
                (self.num_embeddings_total, self.weight.shape[1]),
            )
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, H]
        if self.pctx.world_size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0)
        return self.pctx.all_reduce(out)


class ParallelLMHead(nn.Module):
    """logits = x W^T, each rank computing its vocab slice, all-gathered into [N, V]."""

    def __init__(self, vocab_total: int, hidden: int, pctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.pctx = pctx
        self.vocab_total = vocab_total
        start, stop = shard_range(vocab_total, pctx.rank, pctx.world_size, "vocab")
        self.weight = nn.Parameter(
            torch.empty(stop - start, hidden, dtype=dtype, device=pctx.device), requires_grad=False
        )

    def load(self, weights: Weights, name: str) -> None:
        self.weight.data.copy_(
            weights.get_sharded(
                f"{name}.weight", 0, self.pctx.rank, self.pctx.world_size, (self.vocab_total, self.weight.shape[1])
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, H] -> [N, V]
        return self.pctx.all_gather_last_dim(nn.functional.linear(x, self.weight))
