"""Merge several LoRA adapters into one at load time: LINEAR, TIES, DARE_LINEAR, DARE_TIES.

Applied to the A and B matrices separately (as LoRAX does); all adapters must share one rank. Each
adapter's scale is already folded into its B. DARE's random pruning is seeded, so every shard (and
every reload) computes the same merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.adapters.peft import LoraAdapter
from worker.errors import InvalidArgument
from worker.pb import generate_pb2 as pb


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude."""
    k = int(density * t.numel())
    if k <= 0:
        return torch.zeros_like(t)
    threshold_idx = torch.topk(t.abs().flatten(), k, largest=True).indices
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[threshold_idx] = True
    return t * mask.view_as(t)


def random_prune(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density and rescale the rest by 1 / density."""
    keep = torch.rand(t.shape, generator=generator) < density
    return t * keep / density


def majority_sign_mask(stacked: torch.Tensor, method: int) -> torch.Tensor:
    """Where each entry's sign agrees with the sign elected by total value or by count (pb.MajoritySignMethod)."""
    sign = stacked.sign()
    magnitude = stacked.sum(0) if method == pb.MajoritySignMethod.TOTAL else sign.sum(0)
    elected = torch.where(magnitude >= 0, 1.0, -1.0)
    return sign == elected


def merge_tensors(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    strategy: int,
    density: float,
    sign_method: int,
    generator: torch.Generator,
) -> torch.Tensor:
    w = torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * tensors[0].dim()))
    if strategy == pb.MergeStrategy.LINEAR:
        return (torch.stack(list(tensors)) * w).sum(0)
    if strategy in (pb.MergeStrategy.TIES, pb.MergeStrategy.DARE_TIES):
        pruned = [
            magnitude_prune(t, density) if strategy == pb.MergeStrategy.TIES else random_prune(t, density, generator)
            for t in tensors
        ]
        stacked = torch.stack(pruned)
        mask = majority_sign_mask(stacked, sign_method)
        weighted = stacked * w * mask
        return weighted.sum(0) / mask.sum(0).clamp(min=1)
    if strategy == pb.MergeStrategy.DARE_LINEAR:
        return (torch.stack([random_prune(t, density, generator) for t in tensors]) * w).sum(0)
    raise InvalidArgument(f"unknown merge_strategy {strategy}")


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    strategy: int,
    density: float,
    sign_method: int,
    seed: int = 0,
) -> LoraAdapter:
    if len(weights) not in (0, len(adapters)):
        raise InvalidArgument(f"{len(weights)} merge weights for {len(adapters)} adapters")
    weights = list(weights) or [1.0 / len(adapters)] * len(adapters)
    if strategy != pb.MergeStrategy.LINEAR and not 0.0 < density <= 1.0:
        raise InvalidArgument(f"merge density must be in (0, 1], got {density}")
    ranks = {a.rank for a in adapters}
    if len(ranks) != 1:
        raise InvalidArgument(f"adapters to merge must share one rank, got ranks {sorted(ranks)}")
    keys = set(adapters[0].weights)
    for a in adapters[1:]:
        if set(a.weights) != keys:
            raise InvalidArgument("adapters to merge must target the same modules and layers")
    g = torch.Generator().manual_seed(seed)
    merged = {}
    for key in sorted(keys):
        merged[key] = (
            merge_tensors([ad.weights[key][0] for ad in adapters], weights, strategy, density, sign_method, g),
            merge_tensors([ad.weights[key][1] for ad in adapters], weights, strategy, density, sign_method, g),
        )
    return LoraAdapter(ranks.pop(), merged)
