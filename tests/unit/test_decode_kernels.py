"""The opt-in decode kernel candidates (worker/layers/decode_kernels.py, issue 17 P1) on the CPU through the
Triton interpreter (fp32 and fp16; bf16 and the PDL launches themselves run in scripts/gpu_check_p1.py):

- act GEMV: dense_gemv(gate_up, w, act=True) equals dense_gemv(silu_mul(gate_up), w) bit for bit (same tiles,
  same split-K order; the activation rounds as the SiLU-mul kernel), M = 1 (elementwise path) and M > 1
  (tl.dot), N and K not multiples of the tile, split-K 1..3, prefetch on and off; and the fp64 product.
- the model: the tiny model with mlp.c_proj taking the act GEMV gives the reference (unfused) model's logits.
- PDL is off under the interpreter (and off the GPU): the flag changes nothing there.
"""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.gemv" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import within  # noqa: E402
from worker import ops  # noqa: E402
from worker.kernels.fused import silu_mul  # noqa: E402
from worker.kernels.gemv import GemvTiles, counters_for  # noqa: E402
from worker.kernels.gemv_dense import dense_gemv  # noqa: E402
from worker.models.qwen import FlashQwenForCausalLM  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def _gate_up(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(m, 2 * k, generator=g)).to(dtype)  # gate over [-9, 9]: silu's whole curve


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 200), (3, 24, 520), (8, 56, 64)])
def test_act_gemv_equals_silu_mul_then_gemv(m, n, k, dtype):
    """Bitwise equal to the two-kernel path, close to the fp64 product of ops.silu_mul's input, counters
    back at zero."""
    gu = _gate_up(m, k, dtype, seed=m + k)
    g = torch.Generator().manual_seed(n)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    counters = counters_for(n, gu.device)
    act = silu_mul(gu)
    ref = torch.nn.functional.linear(ops.silu_mul(gu).double(), w.double())
    for split, prefetch in ((1, True), (2, False), (3, True)):
        tiles = GemvTiles(block_n=16, block_k=64, num_warps=4, num_stages=1, prefetch=prefetch)
        fused = dense_gemv(gu, w, None, counters, tiles, split_k=split, act=True)
        two = dense_gemv(act, w, None, counters, tiles, split_k=split)
        assert fused.shape == (m, n) and fused.dtype == dtype
        assert torch.equal(fused, two), (split, prefetch, (fused - two).abs().max())
        within(fused, ref, TOL[dtype])
        assert int(counters.abs().sum()) == 0


def test_act_gemv_refuses_a_gate_up_of_the_wrong_width():
    w = torch.randn(16, 64)
    with pytest.raises(ValueError, match=r"x \[2, 100\].*act True"):
        dense_gemv(torch.randn(2, 100), w, act=True)


def test_pdl_is_off_under_the_interpreter_and_changes_nothing():
    from worker.kernels.pdl import active, launch_options

    x = torch.randn(3, 96)
    w = torch.randn(40, 96)
    tiles = GemvTiles(block_n=16, block_k=32, num_warps=4, num_stages=1)
    assert not active(True, x.device) and launch_options(False) == {}
    assert torch.equal(dense_gemv(x, w, None, None, tiles, pdl=True), dense_gemv(x, w, None, None, tiles))


def test_early_go_only_for_its_families_at_few_rows():
    """pdl.level: off without PDL; EARLY for RoPE + store and RMSNorm at one row (measured faster there with
    attn_cuda, slower at 2 and 8); plain PDL for other families and for more rows."""
    from worker.kernels.pdl import EARLY, EARLY_MAX_ROWS, level

    assert EARLY_MAX_ROWS == 1
    on = [level(False, "rope_store", 1), level(True, "rope_store", 1), level(True, "rms_norm", 1)]
    assert on == [0, EARLY, EARLY]
    assert [level(True, "rms_norm", 2), level(True, "rope_store", 8), level(True, "gemv", 1)] == [1, 1, 1]


def test_cuda_decode_attention_forms_by_batch():
    """256 blocks at batch 1 (8-block clusters, 2 chunks in flight) and 2 (4 x 3), each a form paged_decode.cu
    instantiates; batches past MAX_BATCH (direct calls) take the last."""
    from worker.kernels import paged_decode_cuda as pdc

    compiled = {(8, 2), (4, 2), (4, 3), (4, 4)}  # paged_decode_bf16's forms
    assert pdc.MAX_BATCH == 2 and set(pdc.FORMS.values()) <= compiled
    assert [pdc.form_for(b) for b in (1, 2, 7)] == [(8, 2), (4, 3), (4, 3)]


def test_long_context_graphs_only_where_the_cuda_decode_attention_serves():
    """TritonAttention.long_decode, which makes GraphedDecode capture the 1-2 row buckets twice: LONG_CONTEXT's length
    for each with attn_cuda over a bf16 cache of head_dim 128; None (one graph a bucket) with attn_cuda off, an fp8 or
    fp16 cache, or another head size, where the Triton kernels serve every context anyway."""
    from worker.kernels import paged_decode_cuda as pdc
    from worker.layers.attention_triton import TritonAttention

    be = TritonAttention()
    be.attn_cuda = True
    assert be.long_decode(torch.bfloat16, 128) == pdc.LONG_CONTEXT == {1: 3072, 2: 2048}
    assert set(pdc.LONG_CONTEXT) == set(range(1, pdc.MAX_BATCH + 1))
    assert be.long_decode(torch.float8_e4m3fn, 128) is None and be.long_decode(torch.float16, 128) is None
    assert be.long_decode(torch.bfloat16, 64) is None
    be.attn_cuda = False
    assert be.long_decode(torch.bfloat16, 128) is None


def test_cuda_decode_attention_falls_back_where_it_is_not_served(monkeypatch, caplog):
    """attn_cuda: off the GPU, above MAX_BATCH sequences, over fp8 / scaled caches, other head sizes, caches of
    fewer heads (GQA), misaligned rows, other table dtypes, and RoPE it cannot apply, the backend keeps the Triton
    kernels; where the library does not build it says why once and stops asking."""
    from types import SimpleNamespace

    from worker.kernels import paged_decode_cuda as pdc
    from worker.layers.attention_triton import TritonAttention

    be = TritonAttention()
    be.attn_cuda = True
    q, cache = torch.zeros(1, 2, 128, dtype=torch.bfloat16), torch.zeros(4, 16, 2, 128, dtype=torch.bfloat16)
    tables, lens = torch.zeros(1, 4, dtype=torch.int32), torch.ones(1, dtype=torch.int32)

    def why(q=q, k=cache, v=cache, tables=tables, lens=lens, scaled=False) -> str:
        return str(pdc.supports(q, k, v, tables, lens, scaled))

    assert "CUDA devices only" in why()
    assert "head_dim 128" in why(q=q[..., :64])
    assert "unscaled bf16" in why(k=cache.to(torch.float8_e4m3fn)) and "unscaled bf16" in why(scaled=True)
    assert "one cache head a query head" in why(k=cache[:, :, :1], v=cache[:, :, :1])
    assert "one layout" in why(v=torch.zeros(4, 32, 2, 128, dtype=torch.bfloat16)[:, :16])
    assert "8-byte vectors" in why(q=torch.zeros(1, 2, 130, dtype=torch.bfloat16)[..., 1:129])
    assert "int32 tables" in why(tables=tables.long())
    rope = pdc.Rope(q, q, torch.zeros(1, 64), torch.zeros(1, 64), None, torch.zeros(1, dtype=torch.long))
    assert pdc.rope_serves(q, rope) is None
    assert "all 128 dims" in str(pdc.rope_serves(q, rope._replace(cos=torch.zeros(1, 32), sin=torch.zeros(1, 32))))
    assert "int64 slots" in str(pdc.rope_serves(q, rope._replace(slots=torch.zeros(1, dtype=torch.int32))))
    monkeypatch.setattr(pdc, "supports", lambda *a: None)
    monkeypatch.setattr(pdc, "library", lambda major, minor: "no nvcc (set CUDA_HOME)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    ctx = SimpleNamespace(block_tables=tables, seqlen=SimpleNamespace(input_lengths=lens, max_k=pdc.LONG_CONTEXT[1]))
    assert not be._cuda_serves(q, cache, cache, ctx, False) and be.attn_cuda  # a long context: the Triton kernels
    q2 = torch.zeros(2, 2, 128, dtype=torch.bfloat16)
    ctx.seqlen.max_k = pdc.LONG_CONTEXT[2]  # long for two rows, not for one
    assert not be._cuda_serves(q2, cache, cache, ctx, False) and be.attn_cuda
    ctx.seqlen.max_k = pdc.LONG_CONTEXT[1] - 1
    assert not be._cuda_serves(torch.zeros(3, 2, 128), cache, cache, ctx, False) and be.attn_cuda  # 3 > MAX_BATCH
    with caplog.at_level("WARNING"):
        assert not be._cuda_serves(q, cache, cache, ctx, False)
    assert not be.attn_cuda and "no nvcc" in caplog.text


MODEL_CANDIDATES = {
    "act": dict(act_gemv=True),
    "rope_store": dict(rope_store=True),
    "all": dict(act_gemv=True, rope_store=True, pdl=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(MODEL_CANDIDATES))
def test_model_with_the_candidates_matches_the_reference_model(tmp_path, monkeypatch, dtype, name):
    """The tiny model's linears given GEMV counters and a plan for their shape (as on CUDA) and the candidates
    switched on decode through the dense GEMVs and, at 1 row, the act GEMV (prefill, above GEMV_MAX_M rows, through
    the separate kernels); logits equal the unfused reference model's: fp32 within 1e-4, fp16 within 2e-2 (logits
    of O(4); the GEMV sums in another order than F.linear)."""
    from helpers import TINY, write_checkpoint
    from paged import Paged
    from random_weights import random_checkpoint
    from worker.kernels import gemv_dense
    from worker.layers.decode_kernels import DecodeKernels, apply_decode_kernels
    from worker.layers.linear import RowParallelLinear
    from worker.layers.rotary import Rotary

    cfg = {**TINY, "seq_length": 8}
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, 3))
    ref = FlashQwenForCausalLM.from_pretrained(path, dtype=dtype, progress=False, fused=False)
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=dtype, progress=False, fused=True)
    opts = DecodeKernels(**MODEL_CANDIDATES[name])
    apply_decode_kernels(model.transformer, opts)
    cpu = torch.device("cpu")
    monkeypatch.setitem(gemv_dense.DENSE_GEMV_PLAN, (64, 192), ((8, GemvTiles(16, 32, 4, 1)),))  # c_attn, w2|w1
    for layer in model.transformer.layers():
        assert layer.mlp.c_proj.act_counters is None  # the CPU has no GEMV of its own
        layer.mlp.c_proj.act_counters = counters_for(cfg["hidden_size"], cpu)
        for lin in (layer.attn.c_attn, layer.mlp.gate_up):
            lin.gemv_counters = counters_for(lin.out_features, cpu)
    calls: list[str] = []
    monkeypatch.setattr(RowParallelLinear, "forward_act", _spy(RowParallelLinear.forward_act, calls))
    stores: list[str] = []
    monkeypatch.setattr(Rotary, "rotate_and_store", _spy(Rotary.rotate_and_store, stores))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    runners = [Paged(m, seed=2) for m in (ref, model)]
    seqs = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 11, 12], [3, 1], [40, 41, 42]]
    starts, alphas = [0, 0, 0], [1.0, 1.0, 1.0]
    # prefill (16 rows: no candidate), decode steps of 3 rows (dense GEMV) and of 1 row (dense and act GEMV)
    for step, idx in enumerate(([0, 1, 2], [0, 1, 2], [1], [0, 1, 2])):
        rows = [seqs[i] for i in idx]
        outs = [r.step(idx, rows, [starts[i] for i in idx], alphas[: len(idx)], prefill=step == 0) for r in runners]
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, atol=tol, rtol=0)
        for i, o in zip(idx, outs[0]):
            starts[i] = len(seqs[i])
            seqs[i] = seqs[i] + [int(o[-1].argmax())]
    layers = cfg["num_hidden_layers"]
    assert calls == ["forward_act"] * opts.act_gemv * layers  # the act GEMV at the 1-row step alone (ACT_GEMV_MAX_M)
    assert len(stores) == 4 * layers * opts.rope_store  # prefill and the three decode steps


def _spy(method, calls: list[str]):
    def spy(self, *args):
        calls.append(method.__name__)
        return method(self, *args)

    return spy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rot_half", "with_logn"), [(8, True), (4, False)])
def test_rope_store_equals_rotary_then_store(dtype, rot_half, with_logn):
    """rotary_store_ = ops.rotary_qk then ops.store_kv, bit for bit: q and k rotated in place (k's pass-through dims
    when rotary covers half of head_dim), the new k and v in their slots, a padded row (slot -1) stores nothing,
    every other cache row untouched. 5 heads (not a power of two), head_dim 16, blocks of 4 rows."""
    from worker.kernels.rope_store import rotary_store_

    T, H, D, blocks, bs = 3, 5, 16, 6, 4
    g = torch.Generator().manual_seed(rot_half)
    qkv = torch.randn(T, 3 * H * D, generator=g).to(dtype)
    cos, sin = torch.rand(T, rot_half, generator=g), torch.rand(T, rot_half, generator=g)
    logn = 1 + torch.rand(T, generator=g) if with_logn else None
    caches = [torch.randn(blocks, bs, H, D, generator=g).to(dtype) for _ in range(2)]
    slots = torch.tensor([9, -1, 22])
    q, k, v = qkv.view(T, 3, H, D).unbind(1)
    ref_q, ref_k = ops.rotary_qk(q.clone(), k.clone(), cos, sin, logn)
    ref_caches = [c.clone() for c in caches]
    keep = slots >= 0
    ops.store_kv(ref_k[keep], v[keep], *ref_caches, slots[keep])
    rotary_store_(q, k, v, cos, sin, logn, *caches, slots)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    assert torch.equal(caches[0], ref_caches[0]) and torch.equal(caches[1], ref_caches[1])
    with pytest.raises(ValueError, match="caches"):
        rotary_store_(q, k, v, cos, sin, logn, caches[0].float() if dtype != torch.float32 else caches[0].half(),
                      caches[1], slots)  # fmt: skip
