"""Tensor parallelism on CPU (gloo): world sizes 2 and 4 against world size 1, real processes."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, write_checkpoint
from lora_helpers import write_adapter
from random_weights import random_checkpoint
from tp_worker import run_world

CFG = {**TINY, "seq_length": 8}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    state = random_checkpoint(CFG, seed=11)
    ckpt = write_checkpoint(str(tmp / "ckpt"), CFG, state)
    root = str(tmp / "adapters")
    write_adapter(root, "a4", CFG, 4, 8, seed=1)
    write_adapter(root, "a16", CFG, 16, 16, seed=2, targets=("c_attn", "c_proj", "w1", "w2"))
    return state, {**{w: run_world(ckpt, str(tmp / f"w{w}"), w, root) for w in (1, 2, 4)}, "paths": (ckpt, root)}


@pytest.mark.parametrize("world", [2, 4])
def test_logits_equal_world_size_1(runs, world):
    _, results = runs
    single = results[1][0]
    assert sum(k.startswith("lora") for k in single) == 9
    for rank_result in results[world]:
        for key, ref in single.items():
            if key.startswith(("prefill", "decode", "suffix", "lora")):
                diff = (rank_result[key] - ref).abs().max().item()
                assert diff <= 1e-4, f"{key} at world size {world}: {diff}"


@pytest.mark.parametrize("decode", ["two", "gemm", "gemm_act", "gemm_term", "gemm_norm", "gemm_lanes"])
def test_triton_lora_kernels_under_tp_equal_the_torch_path(runs, tmp_path, decode):
    """The mixed-adapter batch with the Triton LoRA kernels (the Triton interpreter here; on CUDA the
    NCCL test runs them compiled) at world size 2 equals the PyTorch LoRA path at world size 1: column
    layers' B and row layers' A are sharded under the kernels exactly as under the batched matmuls. "gemm"
    (decode steps through the joint GEMM, here at 3 rows): a row-parallel shard's joint rows are its input
    columns of A, and its term joins its partial sum before the all-reduce. "gemm_act" (fused kernels,
    lora_act_shrink): mlp.c_proj's h from each rank's own activation columns in the gate|up launch; "gemm_term"
    (lora_term_first too): each rank's term added by its own c_proj GEMM, before the all-reduce; "gemm_norm"
    (lora_norm_shrink too): c_attn's h from ln_1 with the whole A on each rank, its term from the rank's B;
    "gemm_lanes" (lora_k_lanes too): mlp.c_proj's h in K lanes, each rank's GEMM over its own lanes (the whole B,
    times the rank's partial h)."""
    _, results = runs
    ckpt, root = results["paths"]
    single = results[1][0]
    env = dict(QWEN_TEST_LORA_BACKEND="triton", QWEN_TEST_LORA_DECODE=decode, TRITON_INTERPRET="1")
    _assert_lora_rows_equal(run_world(ckpt, str(tmp_path / "w2t"), 2, root, **env), single)


def test_pools_grown_on_each_rank_equal_world_size_1(runs, tmp_path):
    """Pools that start at 4 lanes a slot grow on every rank when the rank-16 adapter loads (each rank re-lays out its
    own shards; slots.SlotPool.set_rank), and the mixed-adapter batch at world size 2 still equals world size 1's."""
    _, results = runs
    ckpt, root = results["paths"]
    single = results[1][0]
    assert int(single["pool_rank"]) == 16
    grown = run_world(ckpt, str(tmp_path / "w2g"), 2, root, QWEN_TEST_POOL_RANK="4")
    assert all(int(rank_result["pool_rank"]) == 16 for rank_result in grown)
    _assert_lora_rows_equal(grown, single)


def _assert_lora_rows_equal(rank_results, single) -> None:
    """Every rank's mixed-adapter logits ("lora..." keys) within 1e-4 of world size 1's."""
    for rank_result in rank_results:
        for key, ref in single.items():
            if key.startswith("lora"):
                diff = (rank_result[key] - ref).abs().max().item()
                assert diff <= 1e-4, f"{key}: {diff}"


@pytest.mark.parametrize("world", [2, 4])
def test_weight_slices_reassemble(runs, world):
    state, results = runs
    parts = results[world]
    heads, d = CFG["num_attention_heads"], CFG["kv_channels"]
    n = heads // world * d
    # c_attn: rank r holds [q_r; k_r; v_r] -> reassemble q, k, v separately
    q = torch.cat([p["c_attn_w"][:n] for p in parts])
    k = torch.cat([p["c_attn_w"][n : 2 * n] for p in parts])
    v = torch.cat([p["c_attn_w"][2 * n :] for p in parts])
    assert torch.equal(torch.cat([q, k, v]), state["transformer.h.0.attn.c_attn.weight"].float())
    bias = torch.cat([torch.cat([p["c_attn_b"][j * n : (j + 1) * n] for p in parts]) for j in range(3)])
    assert torch.equal(bias, state["transformer.h.0.attn.c_attn.bias"].float())
    w = CFG["intermediate_size"] // 2 // world
    assert torch.equal(torch.cat([p["gate_up"][:w] for p in parts]), state["transformer.h.0.mlp.w2.weight"].float())
    assert torch.equal(torch.cat([p["gate_up"][w:] for p in parts]), state["transformer.h.0.mlp.w1.weight"].float())
    assert torch.equal(
        torch.cat([p["attn_c_proj"] for p in parts], 1), state["transformer.h.0.attn.c_proj.weight"].float()
    )
    assert torch.equal(
        torch.cat([p["mlp_c_proj"] for p in parts], 1), state["transformer.h.0.mlp.c_proj.weight"].float()
    )
    assert torch.equal(torch.cat([p["wte"] for p in parts]), state["transformer.wte.weight"].float())


def test_indivisible_heads_is_a_clear_error():
    from worker.config import QwenConfig
    from worker.distributed import ParallelContext
    from worker.models.qwen import FlashQwenForCausalLM

    cfg = QwenConfig.from_dict({**CFG, "vocab_size": 384})  # vocab divides by 3, heads do not
    with pytest.raises(ValueError, match="4 attention heads do not divide across 3 shards"):
        FlashQwenForCausalLM(cfg, ParallelContext(0, 3))
