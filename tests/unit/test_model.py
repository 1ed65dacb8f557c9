"""The model against the independent float64 reference (tests/reference.py) and transformers' Qwen2.

Our model runs over a paged KV cache with shuffled, non-contiguous blocks, batching sequences of
different lengths; every logit is compared with the reference run on that sequence alone.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, write_checkpoint
from paged import Paged
from random_weights import random_checkpoint
from reference import ref_config, ref_forward, to_qwen2
from worker.layers.rotary import ntk_alpha
from worker.models.qwen import FlashQwenForCausalLM


def make(tmp_path, cfg: dict, seed: int = 0, dtype=torch.float32):
    state = random_checkpoint(cfg, seed)
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, state)
    return state, FlashQwenForCausalLM.from_pretrained(path, dtype=dtype, progress=False)


def alpha(cfg: dict, n: int) -> float:
    c = ref_config(cfg)  # the reference's reading of the version defaults
    return ntk_alpha(n, c["seq_length"], c["use_dynamic_ntk"])


CONFIGS = {
    "default": TINY,
    "ntk_logn_active": {**TINY, "seq_length": 8},
    "base_1e6": {**TINY, "rotary_emb_base": 1e6},
    "rotary_pct_half": {**TINY, "rotary_pct": 0.5, "seq_length": 16},
    "v1_0_spelling": dict(
        model_type="qwen",
        n_embd=64,
        n_head=4,
        n_layer=2,
        ffn_hidden_size=192,
        n_positions=64,
        kv_channels=16,
        vocab_size=256,
        padded_vocab_size=320,
        seq_length=8,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_decode_against_reference(tmp_path, name):
    cfg = CONFIGS[name]
    state, model = make(tmp_path, cfg)
    g = torch.Generator().manual_seed(1)
    lengths = [1, 5, 13, 30]  # up to ~4x seq_length=8: NTK alpha 1, 3, 7 all occur
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    runner = Paged(model)
    alphas = [alpha(cfg, n) for n in lengths]
    out = runner.step(list(range(4)), prompts, [0] * 4, alphas, prefill=True)
    worst = 0.0
    for p, logits in zip(prompts, out):
        ref = ref_forward(state, cfg, p)
        worst = max(worst, (logits.double() - ref).abs().max().item())
    seqs = [list(p) for p in prompts]
    for _ in range(20):  # decode: one token each, alpha fixed at prefill
        nxt = [int(o[-1].argmax()) for o in out]
        for s, t in zip(seqs, nxt):
            s.append(t)
        out = runner.step(list(range(4)), seqs, [len(s) - 1 for s in seqs], alphas, prefill=False)
    for s, p, logits in zip(seqs, prompts, out):
        ref = ref_forward(state, cfg, s, prompt_len=len(p))[-1]
        worst = max(worst, (logits[-1].double() - ref).abs().max().item())
    assert worst <= 1e-4, f"max abs logit diff {worst}"


def test_suffix_prefill_after_cached_prefix(tmp_path):
    cfg = {**TINY, "seq_length": 8}
    state, model = make(tmp_path, cfg, seed=3)
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (17, 11))
    runner = Paged(model, seed=5)
    # first pass caches the first 9 / 4 tokens; the second computes only the rest (cache_len)
    runner.step([0, 1], [a[:9], b[:4]], [0, 0], [alpha(cfg, 17), alpha(cfg, 11)], prefill=True)
    out = runner.step([0, 1], [a, b], [9, 4], [alpha(cfg, 17), alpha(cfg, 11)], prefill=True)
    for seq, logits, start in zip((a, b), out, (9, 4)):
        ref = ref_forward(state, cfg, seq)[start:]
        assert logits.shape[0] == len(seq) - start
        assert (logits.double() - ref).abs().max().item() <= 1e-4


def test_alpha_is_kept_from_prefill(tmp_path):
    """A decode step past seq_length must use the prompt's alpha, not one recomputed from the length."""
    cfg = {**TINY, "seq_length": 8, "use_logn_attn": False}
    state, model = make(tmp_path, cfg, seed=4)
    prompt = list(range(3, 10))  # 7 tokens: alpha 1
    runner = Paged(model)
    runner.step([0], [prompt], [0], [alpha(cfg, 7)], prefill=True)
    seq = list(prompt)
    for t in range(10):  # grows to 17 > 2S: a recomputed alpha would be 7
        seq.append(40 + t)
        out = runner.step([0], [seq], [len(seq) - 1], [alpha(cfg, 7)], prefill=False)
    assert (out[0][-1].double() - ref_forward(state, cfg, seq, prompt_len=7)[-1]).abs().max() <= 1e-4
    assert (out[0][-1].double() - ref_forward(state, cfg, seq, prompt_len=17)[-1]).abs().max() > 1e-3


def test_bf16_within_bound(tmp_path):
    state, model = make(tmp_path, TINY, seed=6, dtype=torch.bfloat16)
    p = list(range(10, 40))
    out = Paged(model).step([0], [p], [0], [1.0], prefill=True)[0]
    ref = ref_forward(state, TINY, p)
    err = (out.double() - ref).abs().max().item()
    assert err <= 0.05 * ref.abs().max().item(), err  # bf16: ~3 significant digits through 2 layers


def test_matches_transformers_qwen2(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = {**TINY, "rotary_emb_base": 1e6}
    state, model = make(tmp_path, cfg, seed=7)
    hf_cfg, hf_state = to_qwen2(state, cfg)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    hf.load_state_dict({k: v.float() for k, v in hf_state.items()}, strict=False)
    lengths = [3, 17, 64]  # <= seq_length: NTK and logn are inactive, the functions coincide
    prompts = [list(range(1 + n, 1 + 2 * n)) for n in lengths]
    ours = Paged(model).step([0, 1, 2], prompts, [0, 0, 0], [1.0] * 3, prefill=True)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            theirs = hf(torch.tensor([p])).logits[0]
        assert (o - theirs).abs().max().item() <= 1e-4
