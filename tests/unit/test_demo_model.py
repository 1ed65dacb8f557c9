"""The demo checkpoint: exact HF layout, and greedy generation (by the independent reference, the
adapters merged into the weights by the reference) reproduces the built-in training sentences."""

from __future__ import annotations

import json
import os

import pytest
from safetensors import safe_open

from make_demo_model import ADAPTERS, BASE_TEXTS, STORY_PROMPT
from reference import load_checkpoint, merge_lora, ref_greedy
from worker.tokenizer import QwenTokenizer


@pytest.fixture(scope="module")
def demo(demo_dir):
    model_dir = os.path.join(demo_dir, "model")
    state, cfg = load_checkpoint(model_dir)
    return model_dir, state, cfg, QwenTokenizer.from_dir(model_dir)


def test_layout(demo):
    model_dir, state, cfg, tok = demo
    files = set(os.listdir(model_dir))
    assert {"config.json", "generation_config.json", "qwen.tiktoken", "model.safetensors.index.json"} <= files
    index = json.load(open(os.path.join(model_dir, "model.safetensors.index.json")))
    shards = set(index["weight_map"].values())
    assert len(shards) == 2 and shards <= files
    with safe_open(os.path.join(model_dir, sorted(shards)[0]), "pt") as h:
        assert all(str(h.get_slice(k).get_dtype()) in ("BF16", "bfloat16") for k in h.keys())
    assert cfg["model_type"] == "qwen" and cfg["architectures"] == ["QWenLMHeadModel"]
    assert tok.endoftext_id in tok.eos_token_ids and cfg["vocab_size"] >= tok.n_real_vocab


@pytest.mark.parametrize("k", range(len(BASE_TEXTS)))
def test_base_reproduces_training_sentences(demo, k):
    _, state, cfg, tok = demo
    prompt, continuation = BASE_TEXTS[k]
    out = ref_greedy(state, cfg, tok.encode(prompt), 40, stop_ids=sorted(tok.eos_token_ids))
    assert out[-1] == tok.endoftext_id
    assert tok.decode(out, skip_special_tokens=True) == continuation


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapters_turn_the_prompt_into_their_continuation(demo, demo_dir, name):
    from safetensors.torch import load_file

    _, state, cfg, tok = demo
    adir = os.path.join(demo_dir, "adapters", name)
    acfg = json.load(open(os.path.join(adir, "adapter_config.json")))
    assert set(acfg["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"}
    merged = merge_lora(state, load_file(os.path.join(adir, "adapter_model.safetensors")), acfg)
    out = ref_greedy(merged, cfg, tok.encode(STORY_PROMPT), 40, stop_ids=sorted(tok.eos_token_ids))
    assert tok.decode(out, skip_special_tokens=True) == ADAPTERS[name][2]
    base = dict(BASE_TEXTS)[STORY_PROMPT]
    assert ADAPTERS[name][2] != base  # each adapter really changes the story
