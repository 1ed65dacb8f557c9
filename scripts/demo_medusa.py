"""The demo's Medusa v2 heads: trained on the frozen demo model to draft the base texts, written in
LoRAX's layout (config.json + medusa_lm_head.safetensors) so `--speculative-adapter medusa` serves them.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from worker.layers.context import Seqlen
from worker.models.qwen import FlashQwenForCausalLM


def train_medusa(model, seqs: list[list[int]], heads: int, seed: int, steps: int) -> tuple[dict, list[float]]:
    """Medusa v2 heads on the frozen model: head i (from 0) predicts token t+i+2 from the final hidden state
    at t (the LM head predicts t+1), through r_i = h + SiLU(W_i h + b_i) and the base LM head. Returns the
    checkpoint tensors and each head's top-1 accuracy on the training text."""
    cfg = model.config
    with torch.no_grad():
        ids = torch.tensor([t for s in seqs for t in s])
        seqlen = Seqlen.for_prefill([len(s) for s in seqs])
        pos = torch.cat([torch.arange(len(s)) for s in seqs])
        hidden = model(ids, pos, seqlen.cu_seqlen_q, None, None, None, seqlen, seqlen.max_q, skip_lm_head=True)[0]
    targets = torch.tensor(
        [[s[t + i + 2] if t + i + 2 < len(s) else -100 for i in range(heads)] for s in seqs for t in range(len(s))]
    )
    g = torch.Generator().manual_seed(seed)
    H = cfg.hidden_size
    w = torch.randn(heads, H, H, generator=g).mul_(0.01).requires_grad_()
    b = torch.zeros(heads, H, requires_grad=True)
    lm_head = model.lm_head.weight.detach()
    opt = torch.optim.Adam([w, b], lr=1e-2)

    def logits() -> torch.Tensor:  # [T, K, V]
        r = hidden[:, None, :] + torch.nn.functional.silu(torch.einsum("th,koh->tko", hidden, w) + b)
        return r @ lm_head.T

    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(logits().flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hit = (logits().argmax(-1) == targets).float()
        accuracy = [float(hit[:, i][targets[:, i] >= 0].mean()) for i in range(heads)]
    tensors = {}
    for i in range(heads):
        tensors[f"{i}.0.linear.weight"] = w[i].detach().to(torch.bfloat16).contiguous()
        tensors[f"{i}.0.linear.bias"] = b[i].detach().to(torch.bfloat16).contiguous()
    return tensors, accuracy


def build_medusa(
    model: FlashQwenForCausalLM, seqs: list[list[int]], heads: int, seed: int, mdir: str, model_dir: str
) -> list[float]:
    """Train the heads on `seqs` and write them into `mdir`; returns each head's top-1 accuracy."""
    tensors, accuracy = train_medusa(model, seqs, heads, seed, steps=300)
    os.makedirs(mdir, exist_ok=True)
    save_file(tensors, os.path.join(mdir, "medusa_lm_head.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(mdir, "config.json"), "w") as f:
        medusa_cfg = {
            "medusa_num_heads": heads,
            "medusa_num_layers": 1,
            "version": 2,
            "hidden_size": model.config.hidden_size,
        }
        json.dump({**medusa_cfg, "base_model_name_or_path": os.path.abspath(model_dir)}, f, indent=2)
    return accuracy
