"""GPTQ test helpers: an independent reader of the checkpoint format, written from spec/quantization.md
(numpy on uint32 words, not the project's torch code), and quantized test checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from helpers import write_checkpoint
from worker.quant.checkpoint import LINEARS, quantization_config, quantize_state


def ind_unpack(words: torch.Tensor, bits: int, axis: int) -> np.ndarray:
    """Packed int32 words -> values, unpacked along `axis` (0: qweight along K, 1: qzeros along N):
    value j of a word sits in bits [bits·j, bits·(j+1)), least significant first."""
    u = words.numpy().view(np.uint32).astype(np.uint64)
    per = 32 // bits
    vals = [(u >> np.uint64(bits * j)) & np.uint64((1 << bits) - 1) for j in range(per)]
    stacked = np.stack(vals, axis=axis + 1)  # the j index right after the packed axis
    shape = list(u.shape)
    shape[axis] *= per
    return stacked.reshape(shape).astype(np.int64)


def ind_dequantize(prefix: str, q: dict[str, torch.Tensor], bits: int, zero_offset: int = 1) -> torch.Tensor:
    """float64 W [N, K] (out, in) of one GPTQ linear: w = (q − (z_stored + 1)) · s[g_idx]."""
    qv = ind_unpack(q[f"{prefix}.qweight"], bits, 0)  # [K, N]
    zv = ind_unpack(q[f"{prefix}.qzeros"], bits, 1)  # [G, N]
    s = q[f"{prefix}.scales"].double().numpy()
    g = q[f"{prefix}.g_idx"].numpy().astype(np.int64)
    w = (qv - (zv[g] + zero_offset)) * s[g]
    return torch.from_numpy(w.T.copy())


def dequantized_state(q: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The float64 state the reference runs: every GPTQ linear read back through ind_dequantize."""
    out: dict[str, torch.Tensor] = {}
    for name, t in q.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            out[f"{prefix}.weight"] = ind_dequantize(prefix, q, bits)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            out[name] = t.double()
    return out


def gptq_checkpoint(
    path: str, cfg: dict, state: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool, act_order: bool
) -> tuple[str, dict[str, torch.Tensor]]:
    """Write a GPTQ checkpoint of `state` (round to nearest; act order with seeded permutations shared by
    a block's w1 and w2) and return (path, the quantized tensors)."""
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    perms: dict[str, torch.Tensor] = {}

    def perm_of(prefix: str, k: int) -> torch.Tensor | None:
        if not act_order:
            return None
        key = prefix.replace("mlp.w1", "mlp.w2")  # gate and up share their input and their row order
        if key not in perms:
            perms[key] = torch.randperm(k, generator=g)
        return perms[key]

    assert set(LINEARS) == {"attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"}
    q = quantize_state(state, bits, group_size, sym, perm_of)
    write_checkpoint(path, {**cfg, "quantization_config": quantization_config(bits, group_size, sym, act_order)}, q)
    return path, q


def rewrite(path: str, q: dict[str, torch.Tensor], cfg: dict) -> None:
    """Rewrite a checkpoint directory with tensors `q` and config `cfg` (for bad-checkpoint tests)."""
    for fn in os.listdir(path):
        os.remove(os.path.join(path, fn))
    write_checkpoint(path, cfg, q)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f) == cfg


def prefill_and_decode(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The logits of a paged prefill of `prompts` (tests/paged.py), then of one decode step after token 7 each."""
    from paged import Paged

    paged, rows, ones = Paged(model), list(range(len(prompts))), [1.0] * len(prompts)
    out = paged.step(rows, prompts, [0] * len(prompts), ones, True)
    seqs = [p + [7] for p in prompts]
    return out + paged.step(rows, seqs, [len(s) - 1 for s in seqs], ones, False)
