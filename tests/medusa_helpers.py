"""Helpers for the Medusa tests: write Medusa head directories, run the model's speculative forward, and an
independent float64 computation of the heads from the spec's formula."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from reference import ref_forward

F64 = torch.float64


def medusa_tensors(H: int, V: int, K: int, L: int, v1: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random heads in the checkpoint layout: `{i}.{j}.linear.weight|bias`, v1 also `{i}.{L}.weight`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(K):
        for j in range(L):
            out[f"{i}.{j}.linear.weight"] = torch.randn(H, H, generator=g) / H**0.5
            out[f"{i}.{j}.linear.bias"] = torch.randn(H, generator=g) * 0.5
        if v1:
            out[f"{i}.{L}.weight"] = torch.randn(V, H, generator=g) / H**0.5
    return out


def write_medusa(
    path: str,
    tensors: dict[str, torch.Tensor],
    K: int,
    L: int,
    file: str = "medusa_lm_head.safetensors",
    **cfg: object,
) -> str:
    """A Medusa directory at `path`: config.json (K, L and `cfg`) and `tensors` in `file`."""
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, file))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"medusa_num_heads": K, "medusa_num_layers": L, "base_model_name_or_path": "tiny", **cfg}, f)
    return path


def forward_spec(model, seqs: list[list[int]], slots: list[int] | None = None):
    """One prefill of `seqs` (no KV cache), each sequence on its adapter pool slot (None: all base): the
    model's (logits [T, V], speculative logits [T, K, V]) for every token."""
    from worker.layers.context import ForwardContext, Seqlen
    from worker.layers.lora import AdapterBatchData
    from worker.layers.rotary import ntk_alpha

    c = model.config
    lens = [len(s) for s in seqs]
    seqlen = Seqlen.for_prefill(lens, ntk_alpha=[ntk_alpha(n, c.seq_length, c.use_dynamic_ntk) for n in lens])
    ctx = ForwardContext.build(
        model.rotary,
        is_prefill=True,
        positions=torch.cat([torch.arange(n) for n in lens]),
        seqlen=seqlen,
        adapter_data=None if slots is None else AdapterBatchData.build(slots, lens, "cpu"),
    )
    rows = None if slots is None else [s for s, n in zip(slots, lens) for _ in range(n)]
    return model.forward_speculative(torch.tensor([t for s in seqs for t in s]), ctx, None, rows)


def ref_hidden(state: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """The final hidden state [T, H] in float64 by the reference model: its LM head replaced by [I; 0]."""
    H = state["transformer.wte.weight"].shape[1]
    eye = torch.zeros_like(state["lm_head.weight"], dtype=F64)
    eye[:H] = torch.eye(H, dtype=F64)
    return ref_forward({**state, "lm_head.weight": eye}, cfg, ids)[:, :H]


def ref_medusa(h: torch.Tensor, tensors: dict[str, torch.Tensor], lm_head: torch.Tensor, K: int, L: int, v1: bool):
    """The spec's formula in float64: r_i = h + SiLU(W_i h + b_i), L blocks; v1 projects each r_i through
    `{i}.{L}.weight`, v2 through the LM head. (logits [T, V], speculative logits [T, K, V])."""
    t = {k: v.to(F64) for k, v in tensors.items()}
    lm = lm_head.to(F64)
    spec = []
    for i in range(K):
        r = h
        for j in range(L):
            r = r + torch.nn.functional.silu(r @ t[f"{i}.{j}.linear.weight"].T + t[f"{i}.{j}.linear.bias"])
        spec.append(r @ (t[f"{i}.{L}.weight"] if v1 else lm).T)
    return h @ lm.T, torch.stack(spec, dim=1)
