"""scripts/quantize.py and the GPTQ solver: the demo model quantized to Int4 by GPTQ (AutoGPTQ layout) is
served by the worker and still generates its trained sentences, with the adapters on the quantized base;
GPTQ's output error on correlated calibration inputs is below round-to-nearest's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT
from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT, greedy
from worker.quant.gptq_format import dequantize, quantize_rtn
from worker.quant.gptq_solver import Hessian, gptq_quantize


@pytest.fixture(scope="module")
def int4(demo_dir, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("int4") / "model")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "quantize.py"), os.path.join(demo_dir, "model"), dst]
    subprocess.run([*cmd, "--bits", "4", "--group-size", "32", "--method", "gptq"], check=True, capture_output=True)
    return dst


def test_layout_is_autogptq(int4):
    from safetensors import safe_open

    cfg = json.load(open(os.path.join(int4, "config.json")))
    assert cfg["quantization_config"] == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": True,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
    }
    assert json.load(open(os.path.join(int4, "quantize_config.json")))["bits"] == 4
    with safe_open(os.path.join(int4, "model.safetensors"), "pt") as h:
        p = "transformer.h.0.mlp.c_proj"
        assert {f"{p}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")} <= set(h.keys())
        assert f"{p}.weight" not in h.keys() and "lm_head.weight" in h.keys()
        dtypes = {t: str(h.get_slice(f"{p}.{t}").get_dtype()) for t in ("qweight", "qzeros", "scales", "g_idx")}
        assert dtypes == {"qweight": "I32", "qzeros": "I32", "scales": "F16", "g_idx": "I32"}
        assert h.get_slice(f"{p}.qweight").get_shape() == [128 // 8, 64]  # [K / 8, N]: mlp width 128 -> hidden 64
        assert {w & 0xFFFFFFFF for w in h.get_tensor(f"{p}.qzeros").flatten().tolist()} == {0x77777777}


def test_int4_demo_model_generates_its_sentences_with_adapters(int4, demo_dir):
    from lora_helpers import attach_manager, load
    from worker.layers.quantized import GPTQRowParallelLinear
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.tokenizer import QwenTokenizer

    tok = QwenTokenizer.from_dir(int4)
    model = FlashQwenForCausalLM.from_pretrained(int4, dtype=torch.float32, progress=False)
    assert isinstance(model.transformer.layers()[0].mlp.c_proj, GPTQRowParallelLinear)
    for prompt, continuation in BASE_TEXTS:
        out = greedy(model, tok.encode(prompt), len(tok.encode(continuation)) + 1, tok.endoftext_id)
        assert tok.decode(out, skip_special_tokens=True) == continuation
    # the adapters (trained on the float base) still steer the Int4 base, through the engine's LoRA path
    mgr, _ = attach_manager(model, os.path.join(demo_dir, "adapters"), max_rank=8, num_slots=2)
    load(mgr, 1, "pirate")
    from paged import Paged

    paged = Paged(model, num_blocks=64)
    seq = tok.encode(STORY_PROMPT)
    n = len(seq)
    out = paged.step([0], [seq], [0], [1.0], True, [mgr.entries[1].slot])
    for _ in range(40):
        seq.append(int(out[0][-1].argmax()))
        if seq[-1] == tok.endoftext_id:
            break
        out = paged.step([0], [seq], [len(seq) - 1], [1.0], False, [mgr.entries[1].slot])
    assert tok.decode(seq[n:], skip_special_tokens=True) == ADAPTERS["pirate"][2]


@pytest.mark.parametrize(("bits", "act_order"), [(4, False), (4, True), (8, False)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, act_order):
    g = torch.Generator().manual_seed(0)
    k, n, t = 64, 48, 512
    mix = torch.randn(k, k, generator=g) * (torch.rand(k, generator=g) * 3)[None, :]  # correlated, uneven scales
    x = torch.randn(t, k, generator=g) @ mix
    w = torch.randn(n, k, generator=g) / k**0.5
    h = Hessian(k)
    h.add(x[: t // 2])
    h.add(x[t // 2 :])
    assert torch.allclose(h.h, 2 * x.double().t() @ x.double() / t)

    def out_err(q) -> float:
        wq = dequantize(q.qweight, q.qzeros, q.scales, q.g_idx, bits, dtype=torch.float64).t()
        return ((x.double() @ (wq - w.double()).t()) ** 2).mean().item()

    gptq = gptq_quantize(w, h.h, bits, 16, True, act_order)
    rtn = quantize_rtn(w, bits, 16, True)
    if act_order:
        assert not torch.equal(gptq.g_idx, rtn.g_idx) and sorted(gptq.g_idx.tolist()) == sorted(rtn.g_idx.tolist())
    assert out_err(gptq) < 0.7 * out_err(rtn)
