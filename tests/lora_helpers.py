"""Helpers for adapter tests: write PEFT adapter directories, wire an AdapterManager to a model."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

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


def attach_manager(model, root: str, max_rank: int = 16, num_slots: int = 4):
    from worker.adapters.pool import AdapterManager

    mgr = AdapterManager(root, model.config, model.pctx, model.dtype, max_rank, num_slots)
    engine = SimpleNamespace(model=model, batches={}, adapters=None)
    mgr.attach(engine)
    return mgr, engine


def load(mgr, index: int, *ids: str, strategy: int = 0, weights=(), density: float = 1.0, sign: int = 0):
    from worker.pb import generate_pb2 as pb

    params = pb.AdapterParameters(adapter_ids=list(ids), weights=list(weights), merge_strategy=strategy,
                                  density=density, majority_sign_method=sign)
    return mgr.load(pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=2, adapter_index=index))
