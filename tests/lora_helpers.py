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


def lora_target(key: str, lin: Any, modules: tuple[str, ...], layer: int = 0) -> Any:
    """A LoRA target (models.qwen.LoraTarget's fields) over the linear `lin`, for slot pools built without a model."""
    return SimpleNamespace(owner=SimpleNamespace(lin=lin), attr="lin", layer=layer, key=key, modules=modules)


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


def attach_manager(model, root: str, max_rank: int = 16, num_slots: int = 4, **kw):
    mgr = manager(root, model.config, model.pctx, model.dtype, max_rank, num_slots, model=model, **kw)
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


def interpreted_lora_decode(tmp_path, seed: int, fused: bool = False, lens=(5, 8, 3), which=(1, 0, 2)):
    """The tiny model (fp32, seq_length 16) with adapters a8 and a16 in slots and the Triton LoRA kernels set on
    every target (the interpreter on a CPU), prompts of `lens` on adapters `which` (0: base) prefilled; returns a
    namespace: model, mgr, terms, merged (state per adapter index, merged), seqs (prompt + first token), prompts,
    which, slots, alphas, paged, cfg."""
    from helpers import TINY, write_checkpoint
    from paged import Paged
    from random_weights import random_checkpoint
    from reference import merge_lora
    from worker.kernels import lora as kernels
    from worker.layers.rotary import ntk_alpha
    from worker.models.qwen import FlashQwenForCausalLM

    seq_length = 16
    cfg = {**TINY, "seq_length": seq_length}
    state = random_checkpoint(cfg, seed=seed)
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, state)
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False, fused=fused)
    root = str(tmp_path / "adapters")
    adapters = [
        write_adapter(root, "a8", cfg, 8, 16, seed=seed + 1),
        write_adapter(root, "a16", cfg, 16, 16, seed=seed + 2),
    ]
    mgr, _ = attach_manager(model, root, max_rank=16, num_slots=3)
    terms = [getattr(t.owner, t.attr).lora for t in model.lora_targets()]
    for term in terms:
        term.kernels = kernels
    for i, name in enumerate(["a8", "a16"], start=1):
        load(mgr, i, name)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lens]
    slots = [mgr.entries[i].slot if i else 0 for i in which]
    alphas = [ntk_alpha(len(p), seq_length, True) for p in prompts]
    paged = Paged(model)
    out = paged.step(list(range(len(lens))), prompts, [0] * len(lens), alphas, True, slots)
    return SimpleNamespace(
        model=model, mgr=mgr, terms=terms, merged=[state] + [merge_lora(state, *ad) for ad in adapters],
        seqs=[p + [int(o[-1].argmax())] for p, o in zip(prompts, out)], prompts=prompts, which=list(which),
        slots=slots, alphas=alphas, paged=paged, cfg=cfg,
    )  # fmt: skip


def count_launches(monkeypatch) -> list[str]:
    """The names of the Triton kernels the interpreter runs from now on (the list fills as they launch)."""
    import triton.runtime.interpreter as interpreter

    launches: list[str] = []
    run = interpreter.InterpretedFunction.run

    def counting(self, *args, **kw):
        launches.append(self.fn.__name__)
        return run(self, *args, **kw)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counting)
    return launches


def term_f64(x, a, b, slot: int, ranks) -> torch.Tensor:
    """Σ_p-parts [B[s, p, :, :r] (A[s, p, :r] x)] for one token, float64, parts side by side."""
    parts = []
    for p in range(a.shape[1]):
        r = int(ranks[p, slot])
        h = a[slot, p, :r].double() @ x.double()
        parts.append(b[slot, p, :, :r].double() @ h)
    return torch.cat(parts)
