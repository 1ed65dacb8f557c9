"""scripts/quantize.py and the GPTQ solver, end to end: the demo model quantized to Int4 by GPTQ (AutoGPTQ
layout) is served by two real shard processes (TP=2 over gloo, through the launcher, on unix sockets) and,
driven by the router with the base model and both adapters in one batch, still generates its trained
sentences; a bad quantized checkpoint stops `qwen-worker serve` at start with the tensor named; GPTQ's
output error on correlated calibration inputs is below round-to-nearest's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import ROOT
from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT
from shards import start_launcher, stop
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


def test_int4_demo_on_two_shards_with_adapters(int4, demo_dir):
    from router_client.router import Router, RouterConfig
    from worker.tokenizer import QwenTokenizer

    shard = start_launcher(int4, os.path.join(demo_dir, "adapters"), num_shard=2, extra=("--quantize", "gptq"))
    try:
        tok = QwenTokenizer.from_dir(int4)
        config = RouterConfig(max_input_length=64, max_total_tokens=128, max_batch_prefill_tokens=1024)
        with Router.connect(f"{shard.uds}-0", tokenizer=tok, config=config) as router:
            jobs = [(p, 0, c) for p, c in BASE_TEXTS]
            jobs += [(STORY_PROMPT, router.load_adapter(name), cont) for name, (_, _, cont) in ADAPTERS.items()]
            handles = [router.submit(p, {}, {"max_new_tokens": 40}, adapter_index=a) for p, a, _ in jobs]
            texts = [h.result(timeout=300).text for h in handles]
        assert texts == [c for _, _, c in jobs]
        assert "weights: GPTQ Int4, group size 32, sym, act order off, v1 zeros" in shard.log()
    finally:
        stop(shard)


def test_v2_zeros_under_a_v1_label_stop_the_start(int4, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(int4, bad)
    path = os.path.join(bad, "model.safetensors")
    state = load_file(path)
    name = "transformer.h.0.attn.c_attn.qzeros"
    state[name] = state[name] + 0x11111111  # every stored nibble 7 -> 8: the v2 convention
    save_file(state, path)
    assert json.load(open(os.path.join(bad, "config.json")))["quantization_config"]["sym"] is True
    cmd = [sys.executable, "-m", "worker.cli", "serve", bad, "--uds-path", str(tmp_path / "s")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"'{name}': every stored zero is 8" in done.stderr and "gptq_v2" in done.stderr


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
