"""Tensor parallelism over NCCL (triton backend): logits at world size 2 (and 4) equal world size 1."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, write_checkpoint
from lora_helpers import write_adapter
from random_weights import random_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
CFG = {**TINY, "seq_length": 8, "kv_channels": 16}


@pytest.mark.parametrize("lora", ["torch", "gemm_lanes"])
def test_nccl_equals_single(tmp_path, lora):
    """lora: the adapters' PyTorch path, or the served "gemm" kernels compiled (fused kernels, every LoRA decode
    kernel up to mlp.c_proj's K lanes) on each rank, against world size 1 on the same path."""
    from tp_worker import run_world

    state = random_checkpoint(CFG, seed=11)
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), CFG, state)
    root = str(tmp_path / "adapters")
    write_adapter(root, "a4", CFG, 4, 8, seed=1)
    write_adapter(root, "a16", CFG, 16, 16, seed=2)
    env = dict(QWEN_TEST_DEVICE="cuda", QWEN_TEST_BACKEND="triton")
    if lora != "torch":
        env.update(QWEN_TEST_LORA_BACKEND="triton", QWEN_TEST_LORA_DECODE=lora)
    worlds = [w for w in (2, 4) if w <= torch.cuda.device_count()]
    single = run_world(ckpt, str(tmp_path / "w1"), 1, root, **env)[0]
    for w in worlds:
        for rank_result in run_world(ckpt, str(tmp_path / f"w{w}"), w, root, **env):
            worst = max(
                (rank_result[k] - v).abs().max().item()
                for k, v in single.items()
                if k.startswith(("prefill", "decode", "suffix", "lora"))
            )
            print(f"NCCL world size {w}: max abs logit diff vs world size 1 = {worst:.2e}")
            assert worst <= 1e-3
