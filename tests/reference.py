"""Independent float64 reference implementation of Qwen v1 (``QWenLMHeadModel``).

Written only from ``/work/shared/spec/qwen-v1.md``; it deliberately shares no code with
the worker under test. Everything is computed eagerly in float64 on the CPU, one sequence
at a time, recomputing the whole prefix for every step. It is meant for tiny random
checkpoints in tests, not for speed.

Public API
----------
- :func:`ref_config` -- normalise a Qwen v1 ``config.json`` dict (both spellings).
- :func:`ntk_alpha` -- dynamic-NTK alpha for a prompt length and training context.
- :func:`apply_rope` -- rotate-half RoPE with partial rotary dims.
- :func:`ref_forward` -- float64 logits for one sequence.
- :func:`ref_greedy` -- greedy generation by repeated full forwards.
- :func:`merge_lora` -- merge a PEFT LoRA adapter into a state dict.
- :func:`load_checkpoint` -- read ``config.json`` + safetensors shards as float64.
- :func:`to_qwen2` -- map to ``transformers``' ``Qwen2ForCausalLM`` (config, state dict).

Random test weights to feed it live in ``tests/random_weights.py``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

F64 = torch.float64

# v1.0 spelling -> v1.1 spelling
_SPELLINGS: dict[str, str] = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_layer": "num_hidden_layers",
    "n_positions": "max_position_embeddings",
    "ffn_hidden_size": "intermediate_size",
}

_VERSION_DEFAULTS: dict[str, dict[str, Any]] = {
    "v1.0": {
        "use_dynamic_ntk": False,
        "use_logn_attn": False,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 151851,
    },
    "v1.1": {
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "layer_norm_epsilon": 1e-6,
        "vocab_size": 151936,
    },
}

_LORA_MODULES: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_proj", "mlp.w1", "mlp.w2")


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------


def ref_config(cfg: dict) -> dict:
    """Normalise a Qwen v1 config dict (either spelling) into one flat dict.

    A config is "v1.0 style" when it uses any of the v1.0 names (``n_embd``, ``n_head``,
    ``n_layer``, ``n_positions``, ``ffn_hidden_size``); then omitted keys take the v1.0
    code's defaults (NTK off, logn off, eps 1e-5, vocab 151851), otherwise the v1.1
    defaults (NTK on, logn on, eps 1e-6, vocab 151936).

    The result always uses the v1.1 names plus derived keys, and normalising it again
    returns the same dict:

    ``hidden_size, num_attention_heads, num_hidden_layers, intermediate_size`` (the
    config value, i.e. twice the MLP width), ``mlp_width`` (= intermediate_size // 2),
    ``max_position_embeddings`` (may be None), ``kv_channels`` (head dim),
    ``rotary_pct``, ``rotary_dims`` (= int(head_dim * rotary_pct)), ``rotary_emb_base``,
    ``seq_length``, ``layer_norm_epsilon``, ``use_dynamic_ntk``, ``use_logn_attn``,
    ``vocab_size`` (rows of lm_head), ``padded_vocab_size`` (rows of wte; defaults to
    vocab_size), ``no_bias``, ``version`` ("v1.0" / "v1.1").

    Raises:
        ValueError: ``seq_length`` missing, a required size missing, the two spellings
            disagreeing, or inconsistent head sizes.
    """
    cfg = dict(cfg)
    v10 = any(k in cfg for k in _SPELLINGS)
    version = "v1.0" if v10 else "v1.1"
    out: dict[str, Any] = {}
    for old, new in _SPELLINGS.items():
        a, b = cfg.get(old), cfg.get(new)
        if a is not None and b is not None and a != b:
            raise ValueError(f"config has both {old}={a} and {new}={b}")
        out[new] = a if a is not None else b
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
        if out[key] is None:
            raise ValueError(f"config lacks {key} (or its v1.0 spelling)")
    if cfg.get("seq_length") is None:
        raise ValueError("config lacks seq_length (it has no default in Qwen v1)")

    defaults = _VERSION_DEFAULTS[version]
    H = int(out["hidden_size"])
    heads = int(out["num_attention_heads"])
    head_dim = int(cfg.get("kv_channels") or H // heads)
    if head_dim * heads != H:
        raise ValueError(f"kv_channels {head_dim} * heads {heads} != hidden_size {H}")
    rotary_pct = float(cfg.get("rotary_pct", 1.0))
    rotary_dims = int(head_dim * rotary_pct)
    if rotary_dims % 2 or not 0 < rotary_dims <= head_dim:
        raise ValueError(f"rotary dims {rotary_dims} must be even and in (0, {head_dim}]")
    base = cfg.get("rotary_emb_base")
    if base is None:
        base = cfg.get("rope_theta", 10000)
    vocab = int(cfg["vocab_size"] if cfg.get("vocab_size") is not None else defaults["vocab_size"])
    padded = cfg.get("padded_vocab_size")
    out.update(
        hidden_size=H,
        num_attention_heads=heads,
        num_hidden_layers=int(out["num_hidden_layers"]),
        intermediate_size=int(out["intermediate_size"]),
        mlp_width=int(out["intermediate_size"]) // 2,
        kv_channels=head_dim,
        rotary_pct=rotary_pct,
        rotary_dims=rotary_dims,
        rotary_emb_base=float(base),
        seq_length=int(cfg["seq_length"]),
        layer_norm_epsilon=float(
            cfg["layer_norm_epsilon"] if cfg.get("layer_norm_epsilon") is not None else defaults["layer_norm_epsilon"]
        ),
        use_dynamic_ntk=bool(cfg.get("use_dynamic_ntk", defaults["use_dynamic_ntk"])),
        use_logn_attn=bool(cfg.get("use_logn_attn", defaults["use_logn_attn"])),
        vocab_size=vocab,
        padded_vocab_size=int(padded) if padded is not None else vocab,
        no_bias=bool(cfg.get("no_bias", True)),
        version=cfg.get("version", version) if not v10 else "v1.0",
    )
    if out["max_position_embeddings"] is not None:
        out["max_position_embeddings"] = int(out["max_position_embeddings"])
    return out


# --------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------


def ntk_alpha(prompt_len: int, seq_length: int) -> int:
    """Dynamic-NTK alpha: ``max(2**ceil(log2(L/S) + 1) - 1, 1)``.

    1 for L <= S, 3 for L <= 2S, 7 for L <= 4S, 15 for L <= 8S, ...
    """
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1")
    context_value = math.log2(prompt_len / seq_length) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def rope_base(cfg: dict, prompt_len: int) -> float:
    """Effective rotary base for a sequence whose prefill (prompt) length is ``prompt_len``."""
    c = ref_config(cfg)
    base = c["rotary_emb_base"]
    if c["use_dynamic_ntk"]:
        d = c["rotary_dims"]
        base = base * ntk_alpha(prompt_len, c["seq_length"]) ** (d / (d - 2))
    return base


def rope_cos_sin(
    positions: Tensor, rot_dims: int, base: float, inv_freq_dtype: torch.dtype = F64
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [len(positions), rot_dims] (float64) for rotate-half RoPE.

    ``inv_freq = 1 / base**(arange(0, d, 2)/d)``; computed in ``inv_freq_dtype`` (the
    original computes it in fp32; float64 by default here) and then used in float64.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dims, 2, dtype=inv_freq_dtype) / rot_dims))
    freqs = torch.outer(positions.to(F64), inv_freq.to(F64))
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, positions: Tensor, rot_dims: int, base: float, inv_freq_dtype: torch.dtype = F64) -> Tensor:
    """Rotate-half (GPT-NeoX) RoPE on the first ``rot_dims`` dims of ``x`` [T, heads, D].

    ``x' = x*cos + rot(x)*sin`` with ``rot(x) = cat(-x2, x1)`` over the rotated part; the
    remaining ``D - rot_dims`` dims pass through unchanged.
    """
    cos, sin = rope_cos_sin(positions, rot_dims, base, inv_freq_dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]
    xr, xp = x[..., :rot_dims], x[..., rot_dims:]
    x1, x2 = xr[..., : rot_dims // 2], xr[..., rot_dims // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([xr * cos + rotated * sin, xp], dim=-1)


def logn_factors(positions: Tensor, seq_length: int) -> Tensor:
    """Per-position query scale: ``log(p+1)/log(S)`` when ``p+1 > S`` else 1 (float64)."""
    p1 = positions.to(F64) + 1
    return torch.where(p1 > seq_length, torch.log(p1) / math.log(seq_length), torch.ones_like(p1))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` in float64."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _linear(x: Tensor, state: dict[str, Tensor], name: str) -> Tensor:
    y = x @ state[name + ".weight"].to(F64).T
    b = state.get(name + ".bias")
    return y if b is None else y + b.to(F64)


# --------------------------------------------------------------------------------------
# forward / generation
# --------------------------------------------------------------------------------------


def ref_forward(
    state: dict[str, Tensor],
    cfg: dict,
    ids: Sequence[int],
    prompt_len: int | None = None,
    *,
    inv_freq_dtype: torch.dtype = F64,
    kv_out: list[tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """Float64 logits ``[len(ids), vocab_size]`` for one sequence (positions 0..len-1, causal).

    Dynamic-NTK alpha is computed from ``prompt_len`` (default ``len(ids)``), so the logits a
    server produces at decode step t of a request with prompt ``P`` equal
    ``ref_forward(P + generated, prompt_len=len(P))[t]``. logn scaling uses each token's
    absolute position. Any ``*.bias`` present in ``state`` for a linear layer is added
    (``no_bias=false`` checkpoints); ``c_attn`` always has one in released checkpoints.
    ``kv_out``, when given, receives each layer's (k after RoPE, v) [T, heads, D] (what a KV cache holds).
    """
    c = ref_config(cfg)
    ids = [int(i) for i in ids]
    T = len(ids)
    if T == 0:
        raise ValueError("empty sequence")
    P = T if prompt_len is None else int(prompt_len)
    H, nh, D = c["hidden_size"], c["num_attention_heads"], c["kv_channels"]
    wte = state["transformer.wte.weight"].to(F64)
    lm_head = state["lm_head.weight"].to(F64)
    if wte.shape[1] != H or lm_head.shape[1] != H:
        raise ValueError("embedding width does not match hidden_size")
    if lm_head.shape[0] != c["vocab_size"]:
        raise ValueError(f"lm_head has {lm_head.shape[0]} rows, config vocab_size {c['vocab_size']}")
    if min(ids) < 0 or max(ids) >= wte.shape[0]:
        raise ValueError("token id out of range of wte")

    eps = c["layer_norm_epsilon"]
    pos = torch.arange(T)
    base = rope_base(c, P)
    scale = 1.0 / math.sqrt(D)
    qscale = logn_factors(pos, c["seq_length"]) if c["use_logn_attn"] else torch.ones(T, dtype=F64)
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    x = wte[torch.tensor(ids)]
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        h = rms_norm(x, state[p + "ln_1.weight"].to(F64), eps)
        qkv = _linear(h, state, p + "attn.c_attn")  # [T, 3H]
        q, k, v = qkv.split(H, dim=-1)
        q, k, v = (t.reshape(T, nh, D) for t in (q, k, v))
        q = apply_rope(q, pos, c["rotary_dims"], base, inv_freq_dtype)
        k = apply_rope(k, pos, c["rotary_dims"], base, inv_freq_dtype)
        q = q * qscale[:, None, None]
        if kv_out is not None:
            kv_out.append((k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(T, H)
        x = x + _linear(attn, state, p + "attn.c_proj")
        h = rms_norm(x, state[p + "ln_2.weight"].to(F64), eps)
        up = _linear(h, state, p + "mlp.w1")
        gate = _linear(h, state, p + "mlp.w2")
        x = x + _linear(up * torch.nn.functional.silu(gate), state, p + "mlp.c_proj")
    x = rms_norm(x, state["transformer.ln_f.weight"].to(F64), eps)
    return x @ lm_head.T


def ref_greedy(
    state: dict[str, Tensor], cfg: dict, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int] = ()
) -> list[int]:
    """Greedy decoding; returns the generated ids only (not the prompt).

    Each step recomputes the full forward with ``prompt_len=len(prompt_ids)`` (NTK alpha
    fixed at prefill). Ties pick the lowest id (``torch.argmax``). When a token in
    ``stop_ids`` is generated it IS included as the last element and generation stops.
    """
    stops = {int(s) for s in stop_ids}
    seq = [int(t) for t in prompt_ids]
    P = len(seq)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(torch.argmax(ref_forward(state, cfg, seq, prompt_len=P)[-1]))
        out.append(tok)
        seq.append(tok)
        if tok in stops:
            break
    return out


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


def lora_scale(adapter_cfg: dict, r: int | None = None) -> float:
    """``lora_alpha / r`` (``lora_alpha / sqrt(r)`` when ``use_rslora``)."""
    r = int(r if r is not None else adapter_cfg["r"])
    alpha = float(adapter_cfg.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if adapter_cfg.get("use_rslora", False) else alpha / r


def merge_lora(state: dict[str, Tensor], adapter_tensors: dict[str, Tensor], adapter_cfg: dict) -> dict[str, Tensor]:
    """Return a new float64 state with every LoRA pair merged: ``W += B @ A * scale``.

    Keys like ``base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight`` are mapped
    by their full module path (so ``attn.c_proj`` and ``mlp.c_proj`` never collide) to
    ``transformer.h.{i}.attn.c_attn.weight``. An optional adapter-name segment
    (``lora_A.default.weight``) is tolerated. Non-LoRA tensors (``modules_to_save``, e.g.
    ``transformer.wte.weight`` / ``lm_head.weight``, optionally with
    ``.modules_to_save.default``) replace the base tensor. Unknown keys raise.
    """
    if adapter_cfg.get("rank_pattern") or adapter_cfg.get("alpha_pattern"):
        raise NotImplementedError("rank_pattern / alpha_pattern not supported by the reference")
    if adapter_cfg.get("use_dora"):
        raise NotImplementedError("DoRA not supported by the reference")
    new = {k: v.to(F64).clone() for k, v in state.items()}
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in adapter_tensors.items():
        k = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", k)
        if m:
            module, which = m.group(1), m.group(2)
            if not any(module.endswith("." + s) for s in _LORA_MODULES):
                raise ValueError(f"LoRA on unsupported module {module!r}")
            if module + ".weight" not in new:
                raise KeyError(f"LoRA key {key!r} has no base weight {module}.weight")
            pairs.setdefault(module, {})[which] = t.to(F64)
            continue
        k = k.replace(".modules_to_save.default", "").replace(".original_module", "")
        if k in new and new[k].shape == t.shape:
            new[k] = t.to(F64).clone()
            continue
        raise KeyError(f"unrecognised adapter tensor {key!r}")
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"incomplete LoRA pair for {module}")
        A, B = ab["lora_A"], ab["lora_B"]
        W = new[module + ".weight"]
        if A.shape[0] != B.shape[1] or B.shape[0] != W.shape[0] or A.shape[1] != W.shape[1]:
            raise ValueError(f"LoRA shapes A{tuple(A.shape)} B{tuple(B.shape)} vs W{tuple(W.shape)}")
        new[module + ".weight"] = W + (B @ A) * lora_scale(adapter_cfg, A.shape[0])
    return new


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------


def load_checkpoint(model_dir: str) -> tuple[dict[str, Tensor], dict]:
    """Read ``config.json`` and all safetensors weights (float64) from ``model_dir``.

    Uses ``model.safetensors.index.json``'s ``weight_map`` when present, otherwise every
    ``*.safetensors`` file in the directory. Returns ``(state, raw_config_dict)``.
    """
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {model_dir}")
    state: dict[str, Tensor] = {}
    for name in files:
        for k, v in load_file(os.path.join(model_dir, name)).items():
            state[k] = v.to(F64)
    return state, cfg


def to_qwen2(state: dict[str, Tensor], cfg: dict):
    """Map a Qwen v1 checkpoint to ``transformers.Qwen2ForCausalLM`` (config, state dict).

    q/k/v weights and biases come from splitting ``c_attn`` on dim 0; ``o_proj`` =
    ``attn.c_proj``; ``gate_proj`` = ``mlp.w2``; ``up_proj`` = ``mlp.w1``; ``down_proj`` =
    ``mlp.c_proj``. Uses ``rope_parameters={"rope_type": "default", "rope_theta": base}``
    (transformers 5.x). Qwen2 has neither dynamic NTK nor logn attention, so the mapping
    is only equivalent for sequences of length <= ``seq_length`` (or with both off).
    ``vocab_size`` = rows of ``lm_head``; ``wte`` is truncated / zero-padded to that.

    Raises:
        ValueError: ``rotary_pct != 1`` or any bias besides ``c_attn``'s (not expressible).
    """
    from transformers import Qwen2Config

    c = ref_config(cfg)
    if c["rotary_dims"] != c["kv_channels"]:
        raise ValueError("Qwen2 cannot express rotary_pct < 1")
    H = c["hidden_size"]
    V = state["lm_head.weight"].shape[0]
    conf = Qwen2Config(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=c["mlp_width"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_attention_heads"],
        hidden_act="silu",
        max_position_embeddings=max(c["seq_length"], c["max_position_embeddings"] or 0, 32768),
        rms_norm_eps=c["layer_norm_epsilon"],
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": c["rotary_emb_base"]},
        use_sliding_window=False,
    )
    wte = state["transformer.wte.weight"].to(F64)
    if wte.shape[0] >= V:
        wte = wte[:V].clone()
    else:
        wte = torch.cat([wte, torch.zeros(V - wte.shape[0], H, dtype=F64)])
    sd: dict[str, Tensor] = {
        "model.embed_tokens.weight": wte,
        "model.norm.weight": state["transformer.ln_f.weight"].to(F64),
        "lm_head.weight": state["lm_head.weight"].to(F64),
    }
    for i in range(c["num_hidden_layers"]):
        p, o = f"transformer.h.{i}.", f"model.layers.{i}."
        for n in ("attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"):
            if p + n + ".bias" in state:
                raise ValueError(f"{p + n}.bias not expressible in Qwen2")
        qw, kw, vw = state[p + "attn.c_attn.weight"].to(F64).split(H, dim=0)
        qb, kb, vb = state[p + "attn.c_attn.bias"].to(F64).split(H, dim=0)
        sd.update(
            {
                o + "input_layernorm.weight": state[p + "ln_1.weight"].to(F64),
                o + "post_attention_layernorm.weight": state[p + "ln_2.weight"].to(F64),
                o + "self_attn.q_proj.weight": qw,
                o + "self_attn.q_proj.bias": qb,
                o + "self_attn.k_proj.weight": kw,
                o + "self_attn.k_proj.bias": kb,
                o + "self_attn.v_proj.weight": vw,
                o + "self_attn.v_proj.bias": vb,
                o + "self_attn.o_proj.weight": state[p + "attn.c_proj.weight"].to(F64),
                o + "mlp.gate_proj.weight": state[p + "mlp.w2.weight"].to(F64),
                o + "mlp.up_proj.weight": state[p + "mlp.w1.weight"].to(F64),
                o + "mlp.down_proj.weight": state[p + "mlp.c_proj.weight"].to(F64),
            }
        )
    return conf, {k: v.contiguous() for k, v in sd.items()}
