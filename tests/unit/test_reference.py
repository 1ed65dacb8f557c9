"""Checks that the float64 Qwen v1 reference (tests/reference.py) is itself right.

Where an independent implementation exists (transformers' Qwen2ForCausalLM, computing in
float64) the reference must agree to 1e-8; the Qwen-v1-only features (dynamic NTK, logn,
partial rotary, LoRA merge, config defaults) are checked by targeted properties.
"""

from __future__ import annotations

import math
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import reference as R  # noqa: E402
from random_weights import random_checkpoint, random_lora  # noqa: E402

F64 = torch.float64


def small_cfg(**over) -> dict:
    cfg = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 192,  # MLP width 96
        "kv_channels": 16,
        "vocab_size": 300,
        "seq_length": 64,
        "max_position_embeddings": 64,
        "rotary_pct": 1.0,
        "rotary_emb_base": 10000,
        "layer_norm_epsilon": 1e-6,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "no_bias": True,
        "tie_word_embeddings": False,
    }
    cfg.update(over)
    return cfg


def rand_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# ---------------------------------------------------------------------------------------
# transformers Qwen2 made to compute fully in float64
# ---------------------------------------------------------------------------------------


def _f64_rmsnorm_forward(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _f64_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    return out, w


def _f64_rotary_forward(self, x, position_ids):
    freqs = position_ids[..., None].to(F64) * self.inv_freq.to(F64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.fixture
def hf_qwen2(monkeypatch):
    """Build a float64 eager Qwen2ForCausalLM from (state, cfg) via R.to_qwen2.

    transformers computes RMSNorm, softmax and RoPE tables in fp32 even for a float64
    model; those three spots are patched to stay in float64 so 1e-8 agreement is possible.
    """
    from transformers import Qwen2ForCausalLM
    from transformers.models.qwen2 import modeling_qwen2 as mq

    monkeypatch.setattr(mq, "eager_attention_forward", _f64_eager_attention)

    def build(state, cfg):
        conf, sd = R.to_qwen2(state, cfg)
        conf._attn_implementation = "eager"
        model = Qwen2ForCausalLM(conf).to(F64).eval()
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and not [m for m in missing if "inv_freq" not in m]
        for m in model.modules():
            if isinstance(m, mq.Qwen2RMSNorm):
                m.forward = types.MethodType(_f64_rmsnorm_forward, m)
        rot = model.model.rotary_emb
        base = conf.rope_parameters["rope_theta"]
        d = conf.hidden_size // conf.num_attention_heads
        rot.inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=F64) / d))
        rot.forward = types.MethodType(_f64_rotary_forward, rot)
        assert model.config._attn_implementation == "eager"
        return model

    return build


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize("base", [10000, 1_000_000])
@pytest.mark.parametrize("length", [1, 7, 64])
def test_matches_transformers_qwen2(hf_qwen2, base, length):
    cfg = small_cfg(rotary_emb_base=base)
    state = random_checkpoint(cfg, seed=1)
    ids = rand_ids(length, 300, seed=length)
    ref = R.ref_forward(state, cfg, ids)
    assert ref.dtype == F64 and ref.shape == (length, 300)
    hf = _hf_logits(hf_qwen2(state, cfg), ids)
    assert (ref - hf).abs().max().item() <= 1e-8
    # non-degenerate: logits vary, and the argmax is not constant
    assert ref.std().item() > 0.3


def test_ntk_base_matches_transformers_with_scaled_theta(hf_qwen2):
    """Beyond seq_length with logn off, NTK = plain RoPE with base*alpha^(d/(d-2))."""
    cfg = small_cfg(seq_length=8, use_logn_attn=False)
    state = random_checkpoint(cfg, seed=2)
    ids = rand_ids(20, 300, seed=3)  # L=20 in (2S, 4S] -> alpha 7
    ref = R.ref_forward(state, cfg, ids)
    d = 16
    hf = _hf_logits(hf_qwen2(state, dict(cfg, use_dynamic_ntk=False, rotary_emb_base=10000 * 7 ** (d / (d - 2)))), ids)
    assert (ref - hf).abs().max().item() <= 1e-8


def test_mlp_gate_is_w2(hf_qwen2):
    """Swapping w1/w2 changes the result (so silu-on-w2 is actually exercised)."""
    cfg = small_cfg()
    state = random_checkpoint(cfg, seed=4)
    ids = rand_ids(9, 300, seed=4)
    swapped = dict(state)
    for i in range(2):
        p = f"transformer.h.{i}.mlp."
        swapped[p + "w1.weight"], swapped[p + "w2.weight"] = state[p + "w2.weight"], state[p + "w1.weight"]
    assert (R.ref_forward(state, cfg, ids) - R.ref_forward(swapped, cfg, ids)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------
# dynamic NTK
# ---------------------------------------------------------------------------------------


def test_ntk_alpha_values():
    S = 8
    assert [R.ntk_alpha(L, S) for L in (1, 7, 8)] == [1, 1, 1]
    assert [R.ntk_alpha(L, S) for L in (9, 12, 16)] == [3, 3, 3]
    assert [R.ntk_alpha(L, S) for L in (17, 20, 32)] == [7, 7, 7]
    assert [R.ntk_alpha(L, S) for L in (33, 64)] == [15, 15]
    assert R.ntk_alpha(65, S) == 31
    assert R.ntk_alpha(8193, 8192) == 3 and R.ntk_alpha(8192, 8192) == 1


def test_ntk_changes_logits_and_prompt_len_matters():
    cfg = small_cfg(seq_length=8, use_logn_attn=False)
    state = random_checkpoint(cfg, seed=5)
    ids = rand_ids(20, 300, seed=6)
    on = R.ref_forward(state, cfg, ids)
    off = R.ref_forward(state, dict(cfg, use_dynamic_ntk=False), ids)
    assert (on - off).abs().max() > 1e-3
    p5 = R.ref_forward(state, cfg, ids, prompt_len=5)
    p20 = R.ref_forward(state, cfg, ids, prompt_len=20)
    assert torch.equal(p20, on)
    assert (p5[-1] - p20[-1]).abs().max() > 1e-3
    # prompt_len <= S means alpha 1: identical to NTK off
    assert (p5 - off).abs().max().item() <= 1e-12
    # position 0 has angle 0 and sees only itself, so the base cannot affect it
    assert (p5[0] - p20[0]).abs().max().item() <= 1e-12


def test_decode_step_equals_prefix_forward():
    """Causality: row t of the full forward = last row of the forward on ids[:t+1]."""
    cfg = small_cfg(seq_length=8)
    state = random_checkpoint(cfg, seed=7)
    ids = rand_ids(14, 300, seed=8)
    full = R.ref_forward(state, cfg, ids, prompt_len=10)
    for t in (9, 11, 13):
        part = R.ref_forward(state, cfg, ids[: t + 1], prompt_len=10)
        assert (part[-1] - full[t]).abs().max().item() <= 1e-10


def test_ref_greedy_consistent():
    cfg = small_cfg(seq_length=8)
    state = random_checkpoint(cfg, seed=9)
    prompt = rand_ids(6, 300, seed=10)
    gen = R.ref_greedy(state, cfg, prompt, 8)
    assert len(gen) == 8
    logits = R.ref_forward(state, cfg, prompt + gen, prompt_len=len(prompt))
    for j, tok in enumerate(gen):
        assert int(torch.argmax(logits[len(prompt) - 1 + j])) == tok
    assert len(set(gen)) > 1
    stopped = R.ref_greedy(state, cfg, prompt, 8, stop_ids=[gen[2]])
    assert stopped == gen[: gen.index(gen[2]) + 1]


# ---------------------------------------------------------------------------------------
# logn
# ---------------------------------------------------------------------------------------


def test_logn_only_after_seq_length():
    cfg = small_cfg(seq_length=8, use_dynamic_ntk=False)
    state = random_checkpoint(cfg, seed=11)
    ids = rand_ids(20, 300, seed=12)
    on = R.ref_forward(state, cfg, ids)
    off = R.ref_forward(state, dict(cfg, use_logn_attn=False), ids)
    assert torch.equal(on[:8], off[:8])
    diffs = (on[8:] - off[8:]).abs().amax(dim=-1)
    assert (diffs > 1e-6).all()
    f = R.logn_factors(torch.arange(20), 8)
    assert torch.equal(f[:8], torch.ones(8, dtype=F64))
    assert f[8].item() == pytest.approx(math.log(9) / math.log(8), abs=1e-15)
    assert f[19].item() == pytest.approx(math.log(20) / math.log(8), abs=1e-15)
    # no upper limit on positions
    assert R.logn_factors(torch.tensor([40000]), 8).item() == pytest.approx(math.log(40001) / math.log(8))


# ---------------------------------------------------------------------------------------
# partial rotary
# ---------------------------------------------------------------------------------------


def test_apply_rope_partial_manual():
    torch.manual_seed(0)
    x = torch.randn(5, 2, 16, dtype=F64)
    pos = torch.arange(5)
    y = R.apply_rope(x, pos, rot_dims=8, base=10000.0)
    assert torch.equal(y[..., 8:], x[..., 8:])
    for p in range(5):
        for j in range(4):  # pairs (j, j+4) rotate by angle p * base^(-2j/8)
            a = p * 10000.0 ** (-2 * j / 8)
            x1, x2 = x[p, :, j], x[p, :, j + 4]
            assert torch.allclose(y[p, :, j], x1 * math.cos(a) - x2 * math.sin(a), atol=1e-14)
            assert torch.allclose(y[p, :, j + 4], x2 * math.cos(a) + x1 * math.sin(a), atol=1e-14)


def _zero_qk_dims(state, cfg, dims: slice) -> dict:
    """Zero the q and k rows (weights and bias) for head dims `dims` of every head."""
    s = dict(state)
    H, nh, D = 64, 4, 16
    for i in range(cfg["num_hidden_layers"]):
        for n in ("weight", "bias"):
            k = f"transformer.h.{i}.attn.c_attn.{n}"
            t = s[k].clone()
            view = t[: 2 * H].view(2, nh, D, *t.shape[1:])
            view[:, :, dims] = 0
            s[k] = t
    return s


def test_rotary_pct_half_leaves_second_half_unrotated():
    """One layer, q/k living only in head dims 8..15: with rotary_pct=0.5 those dims carry
    no position, so the last token's logits are invariant to permuting earlier tokens;
    with rotary_pct=1.0, or with q/k in dims 0..7 instead, they are not."""
    cfg = small_cfg(num_hidden_layers=1, rotary_pct=0.5)
    assert R.ref_config(cfg)["rotary_dims"] == 8
    state = random_checkpoint(cfg, seed=13)
    ids = rand_ids(12, 300, seed=14)
    perm = ids[:-1][::-1] + ids[-1:]
    assert perm != ids

    def last(st, c, seq):
        return R.ref_forward(st, c, seq)[-1]

    unrot_only = _zero_qk_dims(state, cfg, slice(0, 8))
    assert (last(unrot_only, cfg, ids) - last(unrot_only, cfg, perm)).abs().max() <= 1e-12
    full = dict(cfg, rotary_pct=1.0)
    assert (last(unrot_only, full, ids) - last(unrot_only, full, perm)).abs().max() > 1e-6
    rot_only = _zero_qk_dims(state, cfg, slice(8, 16))
    assert (last(rot_only, cfg, ids) - last(rot_only, cfg, perm)).abs().max() > 1e-6
    # and the full model with rotary_pct=0.5 differs from rotary_pct=1.0
    assert (last(state, cfg, ids) - last(state, full, ids)).abs().max() > 1e-6


def test_to_qwen2_rejects_partial_rotary():
    cfg = small_cfg(rotary_pct=0.5)
    with pytest.raises(ValueError):
        R.to_qwen2(random_checkpoint(cfg, 0), cfg)


# ---------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------


def test_merge_lora_zero_b_is_identity():
    cfg = small_cfg()
    state = random_checkpoint(cfg, seed=15)
    tensors, acfg = random_lora(cfg, rank=4, alpha=16, seed=16)
    zero = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in tensors.items()}
    merged = R.merge_lora(state, zero, acfg)
    assert merged.keys() == state.keys()
    for k in state:
        assert merged[k].dtype == F64 and torch.equal(merged[k], state[k].to(F64))


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_lora_delta(rslora):
    cfg = small_cfg()
    state = random_checkpoint(cfg, seed=17)
    r, alpha = 4, 16
    tensors, acfg = random_lora(cfg, rank=r, alpha=alpha, seed=18, use_rslora=rslora)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    merged = R.merge_lora(state, tensors, acfg)
    H, M = 64, 96
    shapes = {
        "attn.c_attn": ((r, H), (3 * H, r)),
        "attn.c_proj": ((r, H), (H, r)),
        "mlp.w1": ((r, H), (M, r)),
        "mlp.w2": ((r, H), (M, r)),
        "mlp.c_proj": ((r, M), (H, r)),
    }
    touched = set()
    for i in range(2):
        for mod, (sa, sb) in shapes.items():
            pre = f"base_model.model.transformer.h.{i}.{mod}."
            A, B = tensors[pre + "lora_A.weight"], tensors[pre + "lora_B.weight"]
            assert tuple(A.shape) == sa and tuple(B.shape) == sb
            assert A.abs().sum() > 0
            assert B.abs().sum() > 0
            w = f"transformer.h.{i}.{mod}.weight"
            expect = state[w].to(F64) + B.to(F64) @ A.to(F64) * scale
            assert (merged[w] - expect).abs().max().item() <= 1e-13
            assert (merged[w] - state[w].to(F64)).abs().max() > 1e-3
            touched.add(w)
    for k in state.keys() - touched:
        assert torch.equal(merged[k], state[k].to(F64))
    # merged model actually behaves differently
    ids = rand_ids(6, 300, seed=19)
    assert (R.ref_forward(merged, cfg, ids) - R.ref_forward(state, cfg, ids)).abs().max() > 1e-3


def test_merge_lora_dispatch_by_full_path():
    """An adapter targeting only attn.c_proj must leave mlp.c_proj alone (and vice versa)."""
    cfg = small_cfg()
    state = random_checkpoint(cfg, seed=20)
    for tgt, other in (("attn.c_proj", "mlp.c_proj"), ("mlp.c_proj", "attn.c_proj")):
        tensors, acfg = random_lora(cfg, 2, 8, seed=21, targets=(tgt,))
        merged = R.merge_lora(state, tensors, acfg)
        assert torch.equal(merged[f"transformer.h.0.{other}.weight"], state[f"transformer.h.0.{other}.weight"].to(F64))
        assert not torch.equal(merged[f"transformer.h.0.{tgt}.weight"], state[f"transformer.h.0.{tgt}.weight"].to(F64))
    both, _ = random_lora(cfg, 2, 8, seed=21, targets=("c_proj",))
    assert {k.split(".h.0.")[1] for k in both if ".h.0." in k} == {
        "attn.c_proj.lora_A.weight",
        "attn.c_proj.lora_B.weight",
        "mlp.c_proj.lora_A.weight",
        "mlp.c_proj.lora_B.weight",
    }


def test_merge_lora_modules_to_save():
    cfg = small_cfg()
    state = random_checkpoint(cfg, seed=22)
    new_head = torch.randn(300, 64)
    merged = R.merge_lora(state, {"base_model.model.lm_head.weight": new_head}, {"r": 4, "lora_alpha": 8})
    assert torch.equal(merged["lm_head.weight"], new_head.to(F64))
    with pytest.raises(KeyError):
        R.merge_lora(state, {"base_model.model.nonsense.weight": new_head}, {"r": 4, "lora_alpha": 8})


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------


def test_config_defaults_by_version():
    v11 = R.ref_config(
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "intermediate_size": 192,
            "seq_length": 64,
        }
    )
    assert (v11["use_dynamic_ntk"], v11["use_logn_attn"], v11["layer_norm_epsilon"], v11["vocab_size"]) == (
        True,
        True,
        1e-6,
        151936,
    )
    assert v11["mlp_width"] == 96 and v11["kv_channels"] == 16 and v11["rotary_dims"] == 16
    v10 = R.ref_config(
        {
            "n_embd": 64,
            "n_head": 4,
            "n_layer": 2,
            "ffn_hidden_size": 192,
            "n_positions": 64,
            "seq_length": 64,
            "padded_vocab_size": 151936,
        }
    )
    assert (v10["use_dynamic_ntk"], v10["use_logn_attn"], v10["layer_norm_epsilon"], v10["vocab_size"]) == (
        False,
        False,
        1e-5,
        151851,
    )
    assert v10["padded_vocab_size"] == 151936 and v10["hidden_size"] == 64
    assert R.ref_config(v10) == v10 and R.ref_config(v11) == v11
    with pytest.raises(ValueError):
        R.ref_config({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 192})
    # rope_theta only used when rotary_emb_base is absent
    assert R.ref_config(dict(small_cfg(), rotary_emb_base=None, rope_theta=1e6))["rotary_emb_base"] == 1e6
    assert R.ref_config(dict(small_cfg(), rope_theta=5.0))["rotary_emb_base"] == 10000.0


def test_v10_spelling_same_model_and_padded_vocab():
    cfg11 = small_cfg(seq_length=8)
    cfg10 = {
        "n_embd": 64,
        "n_head": 4,
        "n_layer": 2,
        "ffn_hidden_size": 192,
        "n_positions": 64,
        "kv_channels": 16,
        "seq_length": 8,
        "vocab_size": 300,
        "padded_vocab_size": 320,
        "rotary_pct": 1.0,
        "rotary_emb_base": 10000,
        "layer_norm_epsilon": 1e-6,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "pos_emb": "rotary",
        "params_dtype": "torch.bfloat16",
    }
    state10 = random_checkpoint(cfg10, seed=23)
    assert state10["transformer.wte.weight"].shape == (320, 64)
    assert state10["lm_head.weight"].shape == (300, 64)
    ids = rand_ids(12, 300, seed=24) + [310]  # an id only wte (padded) has
    a = R.ref_forward(state10, cfg10, ids)
    b = R.ref_forward(state10, cfg11, ids)
    assert a.shape == (13, 300) and torch.equal(a, b)
    # v1.0 defaults (NTK/logn off, eps 1e-5) differ from v1.1's for the same weights
    bare10 = {k: v for k, v in cfg10.items() if k not in ("use_dynamic_ntk", "use_logn_attn", "layer_norm_epsilon")}
    c = R.ref_forward(state10, bare10, ids)
    d = R.ref_forward(state10, dict(cfg11, use_dynamic_ntk=False, use_logn_attn=False, layer_norm_epsilon=1e-5), ids)
    assert torch.equal(c, d) and (c - a).abs().max() > 1e-3


def test_load_checkpoint_roundtrip(tmp_path):
    import json

    from safetensors.torch import save_file

    cfg = small_cfg()
    state = random_checkpoint(cfg, seed=25, dtype=torch.bfloat16)
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for fn, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(tmp_path / fn))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}})
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "stray.safetensors").write_text("not listed in the index; must be ignored")
    loaded, lcfg = R.load_checkpoint(str(tmp_path))
    assert lcfg == cfg and loaded.keys() == state.keys()
    for k in state:
        assert loaded[k].dtype == F64 and torch.equal(loaded[k], state[k].to(F64))
