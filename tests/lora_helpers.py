"""Helpers for adapter tests: write PEFT adapter directories, wire an AdapterManager to a model."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import save_file

from random_weights import random_lora


def write_adapter(root: str, name: str, cfg: dict, rank: int, alpha: float, seed: int, **kw):
    tensors, acfg = random_lora(cfg, rank, alpha, seed, **kw)
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(acfg, f)
    return tensors, acfg


def shapes_only(config, rank: int = 0, world: int = 1):
    """The model of `config` for TP rank `rank` of `world` on the meta device: its LoRA targets' shapes, no
    weights (what an AdapterManager without a real model is built from)."""
    from worker.distributed import ParallelContext
    from worker.models.qwen import FlashQwenForCausalLM

    return FlashQwenForCausalLM(config, ParallelContext(rank, world, torch.device("meta")))


def manager(root: str, config, pctx, dtype: torch.dtype, max_rank: int, num_slots: int, model: Any = None, **kw):
    """An AdapterManager for `pctx` (its model: `model`, or the shapes of `config` on pctx's TP rank)."""
    from worker.adapters.pool import AdapterManager

    if model is None:
        model = shapes_only(config, pctx.rank, pctx.world_size)
    return AdapterManager(root, model, pctx, dtype, max_rank, num_slots, **kw)


def attach_manager(model, root: str, max_rank: int = 16, num_slots: int = 4):
    mgr = manager(root, model.config, model.pctx, model.dtype, max_rank, num_slots, model=model)
    engine = SimpleNamespace(model=model, batches={}, adapters=None)
    mgr.attach(engine)
    return mgr, engine


def load(
    mgr, index: int, *ids: str, strategy: int | None = None, weights=(), density: float = 1.0, sign: int | None = None
):
    from worker.pb import generate_pb2 as pb

    params = pb.AdapterParameters(
        adapter_ids=list(ids),
        weights=list(weights),
        merge_strategy=pb.MergeStrategy.LINEAR if strategy is None else strategy,
        density=density,
        majority_sign_method=pb.MajoritySignMethod.TOTAL if sign is None else sign,
    )
    return mgr.load(
        pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=pb.AdapterSource.LOCAL, adapter_index=index)
    )
