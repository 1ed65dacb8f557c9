"""fp8 KV scales reach the attention layers (worker/layers/kv_scales.py): each layer stores its K/V through
its own (k_scale, v_scale), and the checkpoint's scales count only when every layer has both."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, write_checkpoint
from paged import Paged
from random_weights import random_checkpoint
from worker.layers.kv_scales import every_layer
from worker.models.qwen import FlashQwenForCausalLM
from worker.ops import FP8, FP8_MAX

E4M3_REL = 2.0**-4  # half an ulp of a 3-bit mantissa, relative
E4M3_SUB = 2.0**-9  # the smallest e4m3 subnormal, in units of the scale


def test_each_layer_stores_its_kv_through_its_own_scales(tmp_path):
    """Prefill into an fp32 cache and, with per-layer scales that differ between layers and between K and V,
    into an fp8 cache. Layer 0 sees the same input in both runs: each fp8 entry times its scale is the fp32
    entry, within e4m3 rounding. Later layers read fp8 K/V, so their inputs drift: there, each cache's
    largest entry times its scale is the fp32 cache's largest (an unscaled or other layer's scale is off
    by a factor of 1.5 or more)."""
    path = write_checkpoint(str(tmp_path / "ckpt"), TINY, random_checkpoint(TINY, 0))
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    prompts = [[5, 17, 200, 3, 9, 44, 1], [7, 250, 1]]
    runs = {"fp32": Paged(model, seed=1), "fp8": Paged(model, seed=1, kv_dtype=FP8)}
    runs["fp32"].step([0, 1], prompts, [0, 0], [1.0, 1.0], prefill=True)
    amax = runs["fp32"].cache.amax()  # [layers, 2]
    spread = torch.arange(1, amax.shape[0] + 1, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 1.5]])
    scales = amax / FP8_MAX * spread  # the largest value lands below the fp8 range, by a factor per layer and K/V
    runs["fp8"].cache.set_scales(scales[:, 0], scales[:, 1])
    runs["fp8"].step([0, 1], prompts, [0, 0], [1.0, 1.0], prefill=True)
    for i, (ref, got) in enumerate(zip(runs["fp32"].cache.layers, runs["fp8"].cache.layers)):
        for which in range(2):  # K, V
            s = float(scales[i, which])
            if i == 0:
                torch.testing.assert_close(got[which].float() * s, ref[which], rtol=E4M3_REL, atol=s * E4M3_SUB)
            assert got[which].float().abs().amax() * s == pytest.approx(float(amax[i, which]), rel=0.1)


def test_checkpoint_scales_count_only_when_every_layer_has_them(caplog):
    assert every_layer([(0.5, 0.25), (2.0, 4.0)]) == ([0.5, 2.0], [0.25, 4.0])
    assert every_layer([]) == ([], [])
    with caplog.at_level("WARNING"):
        assert every_layer([(0.5, 0.25), None]) is None
    assert "only some layers" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert every_layer([None, None]) is None
    assert caplog.text == ""  # no scales at all is the usual case: nothing to warn about


@pytest.mark.parametrize("missing", ["k_scale", "v_scale"])
def test_a_layer_with_one_scale_has_none(tmp_path, missing):
    state = random_checkpoint(TINY, 0)
    for i in range(TINY["num_hidden_layers"]):
        for name in ("k_scale", "v_scale"):
            if name != missing or i > 0:
                state[f"transformer.h.{i}.attn.{name}"] = torch.tensor(0.5)
    model = FlashQwenForCausalLM.from_pretrained(
        write_checkpoint(str(tmp_path / "ckpt"), TINY, state), dtype=torch.float32, progress=False
    )
    assert model.attention_layers()[0].checkpoint_kv_scales is None
    assert model.attention_layers()[1].checkpoint_kv_scales == (0.5, 0.5)
    assert model.checkpoint_kv_scales() is None
