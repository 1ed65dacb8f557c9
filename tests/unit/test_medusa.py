"""Medusa heads against an independent float64 computation of the spec's formula (tests/medusa_helpers.py
over the reference model's hidden state): v1 and v2 as the base speculator, per-request v2 and joint
LoRA + Medusa adapters, each row of a mixed batch on its own adapter's heads."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import TINY, within, write_checkpoint
from lora_helpers import attach_manager, load, write_adapter
from medusa_helpers import forward_spec, medusa_tensors, ref_hidden, ref_medusa, write_medusa
from random_weights import random_checkpoint
from reference import merge_lora
from worker.adapters.medusa import load_speculator
from worker.config import QwenConfig
from worker.models.qwen import FlashQwenForCausalLM

H, V = QwenConfig.from_dict(TINY).hidden_size, QwenConfig.from_dict(TINY).vocab_size
SEQS = [[5, 17, 200, 3, 9], [7], [250, 1, 1, 64, 128, 33, 2]]
TOL = 2e-4


@pytest.fixture
def setup(tmp_path):
    state = random_checkpoint(TINY, seed=0)
    path = write_checkpoint(str(tmp_path / "ckpt"), TINY, state)
    root = str(tmp_path / "adapters")
    os.makedirs(root)
    return state, FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False), root


def expected(state, heads: dict, K: int, L: int, v1: bool, seqs=SEQS):
    """Reference (logits, speculative logits) of `seqs` one after another, rows concatenated."""
    out = [ref_medusa(ref_hidden(state, TINY, s), heads, state["lm_head.weight"], K, L, v1) for s in seqs]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


@pytest.mark.parametrize(("version", "K", "L"), [(2, 4, 1), (1, 3, 2), (1, 2, 1)])
def test_base_speculator_matches_float64(setup, version, K, L):
    state, model, root = setup
    heads = medusa_tensors(H, V, K, L, v1=version == 1, seed=K + L)
    write_medusa(os.path.join(root, "spec"), heads, K, L)
    ckpt = load_speculator(root, "spec", model.config)
    assert (ckpt.version, ckpt.num_heads, ckpt.num_layers) == (version, K, L)  # v1/v2 decided from the weights
    model.attach_medusa(ckpt)
    assert model.medusa_heads == K and model.medusa_rows([0, 3]) == [True, True]
    logits, spec = forward_spec(model, SEQS)
    ref_logits, ref_spec = expected(state, heads, K, L, version == 1)
    within(logits, ref_logits, TOL)
    within(spec, ref_spec, TOL)


def test_without_heads_no_speculative_logits(setup):
    state, model, _ = setup
    logits, spec = forward_spec(model, SEQS)
    assert spec is None and model.medusa_heads == 0 and model.medusa_rows([0, 1]) == [False, False]
    within(logits, expected(state, medusa_tensors(H, V, 1, 1, False, 0), 1, 1, False)[0], TOL)


def test_mixed_batch_each_row_uses_its_adapters_heads(setup):
    """Rows on: the base (v1 base speculator), a Medusa-only v2 adapter, a joint LoRA + Medusa adapter (its
    heads in adapter_model.safetensors beside the LoRA), a LoRA-only adapter (falls back to the base's)."""
    state, model, root = setup
    K = 3
    base = medusa_tensors(H, V, K, 2, v1=True, seed=1)
    write_medusa(os.path.join(root, "base"), base, K, 2)
    model.attach_medusa(load_speculator(root, "base", model.config))
    m2 = medusa_tensors(H, V, K, 1, v1=False, seed=2)
    write_medusa(os.path.join(root, "m2"), m2, K, 1)
    joint_lora, joint_cfg = write_adapter(root, "joint", TINY, rank=4, alpha=8, seed=3)
    joint = medusa_tensors(H, V, K, 1, v1=False, seed=4)
    write_medusa(os.path.join(root, "joint"), {**joint_lora, **joint}, K, 1, file="adapter_model.safetensors")
    lora, lora_cfg = write_adapter(root, "lora", TINY, rank=8, alpha=16, seed=5)
    mgr, _ = attach_manager(model, root)
    for index, name in enumerate(["m2", "joint", "lora"], start=1):
        load(mgr, index, name)
    slots = [0] + [mgr.entries[i].slot for i in (1, 2, 3)]
    assert model.medusa_rows(slots) == [True] * 4
    seqs = SEQS + [[9, 8, 7]]
    logits, spec = forward_spec(model, seqs, slots)
    with_joint, with_lora = merge_lora(state, joint_lora, joint_cfg), merge_lora(state, lora, lora_cfg)
    parts = [
        ref_medusa(ref_hidden(state, TINY, seqs[0]), base, state["lm_head.weight"], K, 2, True),
        ref_medusa(ref_hidden(state, TINY, seqs[1]), m2, state["lm_head.weight"], K, 1, False),
        ref_medusa(ref_hidden(with_joint, TINY, seqs[2]), joint, state["lm_head.weight"], K, 1, False),
        ref_medusa(ref_hidden(with_lora, TINY, seqs[3]), base, state["lm_head.weight"], K, 2, True),
    ]
    within(logits, torch.cat([p[0] for p in parts]), TOL)
    within(spec, torch.cat([p[1] for p in parts]), TOL)


def test_heads_follow_the_adapter_slot(setup):
    """Without a base speculator only rows whose adapter carries heads have them; an offloaded adapter's
    heads leave with its slot, and come back with it."""
    state, model, root = setup
    heads = medusa_tensors(H, V, 2, 1, v1=False, seed=6)
    write_medusa(os.path.join(root, "m"), heads, 2, 1)
    mgr, _ = attach_manager(model, root)
    load(mgr, 1, "m")
    slot = mgr.entries[1].slot
    assert model.medusa_heads == 2 and model.medusa_rows([0, slot]) == [False, True]
    _, spec = forward_spec(model, SEQS[:2], [0, slot])
    assert spec is not None
    within(
        spec[len(SEQS[0]) :],
        ref_medusa(ref_hidden(state, TINY, SEQS[1]), heads, state["lm_head.weight"], 2, 1, False)[1],
        TOL,
    )
    from worker.pb import generate_pb2 as pb

    mgr.offload(pb.OffloadAdapterRequest(adapter_parameters=mgr.entries[1].params, adapter_index=1))
    assert model.medusa_heads == 0 and model.medusa_rows([slot]) == [False]
    load(mgr, 1, "m")
    assert model.medusa_rows([mgr.entries[1].slot]) == [True]
