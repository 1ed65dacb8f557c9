"""A GPTQ checkpoint served by the model equals the float64 reference run on its dequantized weights
(read back by the independent reader in tests/gptq_helpers.py): Int4/Int8, sym/asym, act order on/off,
a mixed-adapter LoRA batch on the quantized base, and bad checkpoints refused naming the tensor."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gptq_helpers import dequantized_state, gptq_checkpoint, rewrite
from helpers import TINY
from lora_helpers import attach_manager, load, write_adapter
from paged import Paged
from random_weights import random_checkpoint
from reference import merge_lora, ref_forward
from worker.config import ConfigError
from worker.layers.quantized import GPTQColumnParallelLinear, GPTQRowParallelLinear
from worker.models.qwen import FlashQwenForCausalLM
from worker.quant import gptq_format as fmt
from worker.weights import WeightError

CFG = {**TINY, "seq_length": 16}
GROUP = 32  # hidden 64 = 2 groups; mlp width 96 = 3 groups


def _model(path: str) -> FlashQwenForCausalLM:
    return FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)


def _run(model, prompts, slots=None, steps=3):
    """Prefill then greedy decode steps; every step's last-token logits with the sequence so far."""
    paged = Paged(model)
    n = len(prompts)
    out = paged.step(list(range(n)), prompts, [0] * n, [1.0] * n, True, slots)
    results = [(list(p), o) for p, o in zip(prompts, out)]
    seqs = [list(p) for p in prompts]
    for _ in range(steps):
        for s, o in zip(seqs, out):
            s.append(int(o[-1].argmax()))
        out = paged.step(list(range(n)), seqs, [len(s) - 1 for s in seqs], [1.0] * n, False, slots)
        results += [(list(s), o) for s, o in zip(seqs, out)]
    return results


@pytest.mark.parametrize(
    ("bits", "sym", "act_order"), [(4, True, False), (4, False, True), (8, False, False), (8, True, True)]
)
def test_quantized_model_equals_reference_on_dequantized_weights(tmp_path, bits, sym, act_order):
    state = random_checkpoint(CFG, seed=5)
    path, q = gptq_checkpoint(str(tmp_path / "q"), CFG, state, bits, GROUP, sym, act_order)
    model = _model(path)
    layer = model.transformer.layers()[0]
    assert isinstance(layer.attn.c_attn, GPTQColumnParallelLinear)
    assert isinstance(layer.mlp.c_proj, GPTQRowParallelLinear)
    assert layer.attn.c_attn.qweight.dtype == torch.int32 and not hasattr(layer.attn.c_attn, "weight")
    deq = dequantized_state(q, bits)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 6, 13)]
    worst = 0.0
    for seq, logits in _run(model, prompts):
        plen = next(len(p) for p in prompts if seq[: len(p)] == p)
        ref = ref_forward(deq, CFG, seq, prompt_len=plen)[-logits.shape[0] :]
        worst = max(worst, (logits.double() - ref).abs().max().item())
    assert worst <= 1e-4, worst
    # the quantization really changed the weights (a model that ignored it would fail above)
    assert (ref_forward(deq, CFG, prompts[2]) - ref_forward(state, CFG, prompts[2])).abs().max() > 1e-3


def test_mixed_adapter_batch_on_a_quantized_base(tmp_path):
    state = random_checkpoint(CFG, seed=21)
    path, q = gptq_checkpoint(str(tmp_path / "q"), CFG, state, 4, GROUP, False, True)
    model = _model(path)
    root = str(tmp_path / "adapters")
    adapters = {
        "a4": write_adapter(root, "a4", CFG, 4, 8, seed=1),
        "a16": write_adapter(root, "a16", CFG, 16, 16, seed=3, targets=("c_attn", "w2", "mlp.c_proj")),
    }
    mgr, _ = attach_manager(model, root, max_rank=16, num_slots=2)
    load(mgr, 1, "a4")
    load(mgr, 2, "a16")
    deq = dequantized_state(q, 4)
    merged = {0: deq, 1: merge_lora(deq, *adapters["a4"]), 2: merge_lora(deq, *adapters["a16"])}
    g = torch.Generator().manual_seed(5)
    which = [0, 1, 2, 1]
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 9, 3, 11)]
    slots = [mgr.entries[i].slot if i else 0 for i in which]
    worst = 0.0
    for k, (seq, logits) in enumerate(_run(model, prompts, slots)):
        a, plen = which[k % 4], len(prompts[k % 4])
        ref = ref_forward(merged[a], CFG, seq, prompt_len=plen)[-logits.shape[0] :]
        worst = max(worst, (logits.double() - ref).abs().max().item())
    assert worst <= 1e-4, worst


# ------------------------------------------------------------------ bad checkpoints
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    state = random_checkpoint(CFG, seed=2)
    path, q = gptq_checkpoint(str(tmp_path_factory.mktemp("good") / "q"), CFG, state, 4, GROUP, True, False)
    with open(os.path.join(path, "config.json")) as f:
        return q, json.load(f)


def _bad(tmp_path, good, edit, cfg_edit=None):
    q, cfg = good
    q = dict(q)
    edit(q)
    cfg = cfg_edit(json.loads(json.dumps(cfg))) if cfg_edit else cfg
    path = str(tmp_path / "bad")
    os.makedirs(path)
    rewrite(path, q, cfg)
    return path


P = "transformer.h.1.attn.c_attn"


def test_missing_qzeros_names_the_tensor(tmp_path, good):
    path = _bad(tmp_path, good, lambda q: q.pop(f"{P}.qzeros"))
    with pytest.raises(WeightError, match=f"'{P}.qzeros' is missing"):
        _model(path)


def test_wrong_shape_names_the_tensor_and_the_expected_shape(tmp_path, good):
    path = _bad(tmp_path, good, lambda q: q.update({f"{P}.scales": q[f"{P}.scales"][:1]}))
    with pytest.raises(WeightError, match=rf"'{P}.scales': expected shape \(2, 192\), found \(1, 192\)"):
        _model(path)


def test_float_qweight_is_refused(tmp_path, good):
    path = _bad(tmp_path, good, lambda q: q.update({f"{P}.qweight": q[f"{P}.qweight"].float()}))
    with pytest.raises(WeightError, match=f"'{P}.qweight': expected int32"):
        _model(path)


def test_bits_3_is_refused(tmp_path, good):
    def bits3(cfg):
        cfg["quantization_config"]["bits"] = 3
        return cfg

    with pytest.raises(ConfigError, match="bits must be 4 or 8, got 3"):
        _model(_bad(tmp_path, good, lambda q: None, bits3))


def test_v2_zeros_labelled_v1_are_refused_and_served_when_declared(tmp_path, good):
    """Stored zeros of 8 (the true zero, GPTQModel v2) under a v1 label: refused naming the tensor; the same
    tensors with checkpoint_format gptq_v2 load and dequantize with the true zero."""

    def to_v2(q):
        for name in list(q):
            if name.endswith(".qzeros"):
                q[name] = fmt.pack_cols(fmt.unpack_cols(q[name], 4) + 1, 4)

    path = _bad(tmp_path, good, to_v2)
    with pytest.raises(WeightError, match=r"qzeros'.*every stored zero is 8.*gptq_v2"):
        _model(path)

    def declare(cfg):
        cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
        return cfg

    v2 = _model(_bad(tmp_path / "v2", good, to_v2, declare))
    v1 = _model(_bad(tmp_path / "v1", good, lambda q: None))
    ids = torch.arange(7)
    assert torch.equal(_run(v2, [ids.tolist()], steps=0)[0][1], _run(v1, [ids.tolist()], steps=0)[0][1])
