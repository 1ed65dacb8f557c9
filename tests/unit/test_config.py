"""QwenConfig: both spellings, version defaults, validation errors."""

import json

import pytest

from worker.config import ConfigError, QwenConfig

V11 = dict(
    model_type="qwen",
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=256,
    vocab_size=512,
    seq_length=32,
    kv_channels=16,
)
V10 = dict(
    model_type="qwen",
    n_embd=64,
    n_head=4,
    n_layer=2,
    ffn_hidden_size=256,
    n_positions=128,
    seq_length=32,
    kv_channels=16,
    padded_vocab_size=640,
)


def test_v11_defaults():
    c = QwenConfig.from_dict(V11)
    assert (c.use_dynamic_ntk, c.use_logn_attn, c.layer_norm_epsilon) == (True, True, 1e-6)
    assert c.mlp_width == 128 and c.head_dim == 16 and c.rotary_dim == 16
    assert c.padded_vocab_size == 512


def test_v10_spelling_and_defaults():
    c = QwenConfig.from_dict(V10)
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.intermediate_size) == (64, 4, 2, 256)
    assert (c.use_dynamic_ntk, c.use_logn_attn, c.layer_norm_epsilon) == (False, False, 1e-5)
    assert c.vocab_size == 151851 and c.padded_vocab_size == 640
    assert c.max_position_embeddings == 128


def test_rope_theta_and_base():
    assert QwenConfig.from_dict({**V11, "rotary_emb_base": 1e6}).rotary_emb_base == 1e6
    assert QwenConfig.from_dict({**V11, "rope_theta": 5e5}).rotary_emb_base == 5e5
    # rotary_emb_base wins over rope_theta when both are written (the reference reads rotary_emb_base)
    assert QwenConfig.from_dict({**V11, "rotary_emb_base": 1e6, "rope_theta": 10000}).rotary_emb_base == 1e6


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"kv_channels": 8}, "kv_channels"),
        ({"model_type": "qwen2"}, "unknown model_type"),
        ({"seq_length": None}, "seq_length"),
        ({"hidden_size": None}, "hidden_size"),
        ({"intermediate_size": 255}, "even"),
        ({"rotary_pct": 0.0}, "rotary_pct"),
    ],
)
def test_invalid(change, needle):
    raw = {k: v for k, v in {**V11, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=needle):
        QwenConfig.from_dict(raw)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        QwenConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QwenConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**V11, "eos_token_id": [3, 4]}))
    assert QwenConfig.from_pretrained(str(tmp_path)).eos_token_ids == (3, 4)
