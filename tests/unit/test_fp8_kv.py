"""The fp8 (e4m3) KV cache: storage semantics, the Triton kernels against the PyTorch reference, scales
(checkpoint / Warmup calibration), sizing, and what fp8 does to a model's outputs.

e4m3 keeps 3 mantissa bits: rounding to nearest costs at most half an ulp, 2^-4 = 6.25 % of |x| for
x / scale in the normal range [2^-6, 448], and at most 2^-10 × scale (half the smallest subnormal)
below it; |x| / scale above 448 clamps. Measured numbers are printed (pytest -s) and bounded here.

The Triton interpreter (CPU) decodes fp8 exactly, but its fp32 → fp8 cast does not round correctly
(it rounds half-up on one bit and drops the carry into the exponent: -127.99 becomes -64). So on CPU
the Triton store is checked only on values it need not round; caches for the attention kernels are
filled by the reference store, and the rounding store runs in tests/gpu/test_gpu_fp8.py.
"""

from __future__ import annotations

import os
import random
import sys

import pytest

# Triton kernels bind to the interpreter (or not) when defined: use it unless a GPU test module of this
# session has already compiled them for the GPU (then the Triton tests here skip; see _triton).
TRITON_ON_CPU = "worker.kernels.triton_attention" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if TRITON_ON_CPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from helpers import TINY, write_checkpoint  # noqa: E402
from paged import Paged  # noqa: E402
from random_weights import random_checkpoint  # noqa: E402
from worker.distributed import ParallelContext  # noqa: E402
from worker.engine.engine import Engine, EngineConfig  # noqa: E402
from worker.engine.kv_cache import KVCache, parse_kv_dtype  # noqa: E402
from worker.engine.runner import Runner  # noqa: E402
from worker.layers.attention import TorchAttention  # noqa: E402
from worker.layers.context import ForwardContext, Seqlen  # noqa: E402
from worker.models.qwen import FlashQwenForCausalLM  # noqa: E402
from worker.ops import FP8, FP8_MAX, gather_context, scales_from_amax, store_kv  # noqa: E402
from worker.pb import generate_pb2 as pb  # noqa: E402

REL = 2.0**-4  # half an ulp of a 3-bit mantissa, relative
SUB = 2.0**-10  # half the smallest e4m3 subnormal (2^-9), in units of the scale


def stored_error_ok(x: torch.Tensor, read: torch.Tensor, scale: float) -> torch.Tensor:
    """Where |read - x| is within e4m3 rounding of x (for x / scale within ±448)."""
    return (read - x).abs() <= torch.maximum(REL * x.abs(), torch.full_like(x, SUB * scale)) * (1 + 1e-6)


# ------------------------------------------------------------------------ storage semantics
@pytest.mark.parametrize("scale", [1.0, 0.037, 3.5])
def test_store_gather_round_trip_within_e4m3_rounding(scale):
    g = torch.Generator().manual_seed(0)
    T, H, D, bs = 300, 3, 16, 8
    x = torch.randn(2, T, H, D, generator=g) * torch.logspace(-3, 2, T)[None, :, None, None] * scale
    x[0, 0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, 448 * scale])  # in k  # clamps, zero, the largest value
    k, v = x.unbind(0)
    nb = -(-T // bs) + 1
    kc, vc = (torch.full((nb, bs, H, D), float("nan"), dtype=FP8) for _ in range(2))
    slots = torch.randperm(nb * bs, generator=g)[:T]
    store_kv(k, v, kc, vc, slots, k_scale=scale, v_scale=torch.tensor(scale))
    assert kc.dtype == FP8
    read = kc.view(-1, H, D)[slots].float() * scale  # the attend path's dequantisation
    clipped = k.clamp(-FP8_MAX * scale, FP8_MAX * scale)
    assert read[0, 0, :4].tolist() == pytest.approx([448 * scale, -448 * scale, 0.0, 448 * scale])
    assert stored_error_ok(clipped, read, scale).all()
    normal = clipped.abs() >= 2.0**-6 * scale
    rel = ((read - clipped).abs() / clipped.abs())[normal]
    print(f"\nscale {scale}: relative error mean {rel.mean():.4f}, max {rel.max():.4f} (bound {REL})")
    assert rel.max() <= REL and 0.01 < rel.mean() < 0.03  # mean ~ REL / 3 for uniformly spread mantissas


def test_unscaled_cache_is_a_plain_cast():
    """No scales: the cache stores x.to(dtype) exactly as before fp8 existed (bf16 here)."""
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 7, 2, 16, generator=g).unbind(0)
    kc, vc = (torch.zeros(2, 8, 2, 16, dtype=torch.bfloat16) for _ in range(2))
    store_kv(k, v, kc, vc, torch.arange(7))
    assert torch.equal(kc.view(-1, 2, 16)[:7], k.to(torch.bfloat16))


def test_cache_scales_sizing_and_cli_names():
    kv = KVCache(3, 4, 8, 2, 16, FP8, torch.device("cpu"))
    assert kv.is_fp8 and kv.layers[0][0].dtype == FP8 and kv.k_scales.tolist() == [1.0] * 3
    ks = kv.k_scales[1]  # a 0-d view, as the attention layers hold
    kv.set_scales([0.5, 0.25, 2.0], torch.tensor([1.0, 3.0, 4.0]))
    assert float(ks) == 0.25  # views see in-place updates (as kernels in captured graphs do)
    with pytest.raises(ValueError):
        kv.set_scales([1.0, 0.0, 1.0], [1.0] * 3)
    bf16 = KVCache.bytes_per_token(32, 32, 128, torch.bfloat16)
    assert bf16 == 2 * KVCache.bytes_per_token(32, 32, 128, FP8) == 524288  # 7B shape: 512 KiB vs 256 KiB
    assert parse_kv_dtype("fp8_e4m3") is FP8 and parse_kv_dtype("fp8") is FP8
    assert parse_kv_dtype("auto") is None and parse_kv_dtype("bfloat16") is torch.bfloat16
    from worker.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--kv-cache-dtype", "fp8_e4m3", "--kv-scale-margin", "1.5"])
    assert parse_kv_dtype(args.kv_cache_dtype) is FP8 and args.kv_scale_margin == 1.5
    amax = torch.tensor([[448.0, 0.0], [2.0, float("inf")]])
    assert scales_from_amax(amax, 2.0).flatten().tolist() == pytest.approx([2.0, 1.0, 2.0 * 2 / 448, 1.0])


def test_torch_attend_over_fp8_cache_close_to_fp32():
    """The reference's fp8 attention (dequantised keys/values, fp32 math) against the fp32 cache."""
    g = torch.Generator().manual_seed(2)
    H, D, bs, L = 2, 16, 4, 37
    k, v = torch.randn(L, H, D, generator=g), torch.randn(L, H, D, generator=g) * 3
    q = torch.randn(1, H, D, generator=g)
    table = torch.randperm(12, generator=g)[:10].int()
    slots = torch.tensor([int(table[p // bs]) * bs + p % bs for p in range(L)])
    seqlen = Seqlen.for_prefill([1], [L - 1])
    ctx = ForwardContext(
        False, torch.tensor([L - 1]), slots[-1:], table[None], seqlen, torch.ones(1, 8), torch.zeros(1, 8), None, None
    )
    outs = {}
    for dtype, scale in ((torch.float32, None), (FP8, float(v.abs().max() / FP8_MAX))):
        kc, vc = (torch.zeros(12, bs, H, D, dtype=dtype) for _ in range(2))
        store_kv(k, v, kc, vc, slots, scale, scale)
        if scale is not None:
            assert torch.equal(gather_context(kc, table, L).float() * scale, (k / scale).to(FP8).float() * scale)
        outs[dtype] = TorchAttention().attend(q, None, None, kc, vc, ctx, D**-0.5, k_scale=scale, v_scale=scale)
    err = (outs[FP8] - outs[torch.float32]).abs().max().item()
    print(f"\nattention output max |fp8 - fp32| = {err:.4f} (outputs ~{outs[torch.float32].abs().max():.2f})")
    assert err < 0.1


# ------------------------------------------------------------------------ Triton (interpreter)
def _triton():
    if not TRITON_ON_CPU:
        pytest.skip("Triton kernels already compiled for the GPU in this session")
    pytest.importorskip("triton")
    from worker.kernels.triton_attention import Tiles
    from worker.layers.attention_triton import TritonAttention

    return TritonAttention, Tiles(prefill_m=16, prefill_n=16, decode_n=8)


def test_triton_store_fp8_scales_clamps_and_skips_padding():
    TritonAttention, _ = _triton()
    g = torch.Generator().manual_seed(3)
    H, D, bs = 3, 16, 8
    codes = torch.randint(0, 256, (2, 9, H, D), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    x = codes.view(FP8).float() * 0.25  # exactly representable after / 0.25: the interpreter needs no rounding
    x[0, 0, 0, :2] = torch.tensor([1e6, -1e6])  # clamp to ±448 × 0.25
    k, v = x.unbind(0)
    slots = torch.tensor([3, -1, 17, 40, -1, 0, 9, 33, 12])
    ours = [torch.zeros(6, bs, H, D, dtype=FP8) for _ in range(2)]
    ref = [c.clone() for c in ours]
    TritonAttention().store(k, v, *ours, slots, k_scale=torch.tensor(0.25), v_scale=0.25)
    keep = slots >= 0
    store_kv(k[keep], v[keep], *ref, slots[keep], 0.25, 0.25)
    assert torch.equal(ours[0].view(torch.uint8), ref[0].view(torch.uint8))
    assert torch.equal(ours[1].view(torch.uint8), ref[1].view(torch.uint8))
    assert ours[0].view(-1, H, D)[3, 0, :2].float().tolist() == [448.0, -448.0]


class Fp8Batch:
    """A paged batch over fp8 caches filled by the reference store (shuffled blocks, NaN-coded unused rows)."""

    def __init__(
        self,
        new: list[int],
        cached: list[int],
        prefill: bool,
        dtype: torch.dtype,
        seed: int,
        H: int = 2,
        D: int = 16,
        bs: int = 8,
    ):
        g = torch.Generator().manual_seed(seed)
        total = [c + n for c, n in zip(cached, new)]
        need = [-(-t // bs) for t in total]
        free = list(range(sum(need) + 2))
        random.Random(seed).shuffle(free)
        pad = free.pop()
        blocks = [[free.pop() for _ in range(n)] for n in need]
        self.tables = torch.tensor([b + [pad] * (max(need) - len(b)) for b in blocks], dtype=torch.int32)
        shape = (sum(need) + 2, bs, H, D)
        self.k_cache = torch.full(shape, float("nan")).to(FP8)
        self.v_cache = torch.full(shape, float("nan")).to(FP8)
        self.k_scale, self.v_scale = torch.tensor(0.05), 0.02  # a tensor and a float
        slots = [torch.tensor([blocks[b][p // bs] * bs + p % bs for p in range(t)]) for b, t in enumerate(total)]
        for s in slots:  # K ~ 4 (values up to ~80 / 0.05 clamp at 448), V ~ 1
            store_kv(
                torch.randn(len(s), H, D, generator=g) * 4,
                torch.randn(len(s), H, D, generator=g),
                self.k_cache,
                self.v_cache,
                s,
                self.k_scale,
                self.v_scale,
            )
        T = sum(new)
        self.q = torch.randn(T, H, D, generator=g).to(dtype)
        self.ctx = ForwardContext(
            prefill,
            torch.zeros(T, dtype=torch.long),
            None,
            self.tables,
            Seqlen.for_prefill(new, cached),
            torch.ones(T, D // 2),
            torch.zeros(T, D // 2),
            None,
            None,
        )

    def attend(self, backend, **kw) -> torch.Tensor:
        return backend.attend(
            self.q,
            self.q,
            self.q,
            self.k_cache,
            self.v_cache,
            self.ctx,
            0.25,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            **kw,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("new,cached", [([1, 3, 17, 9], [5, 0, 16, 31]), ([2, 40], [70, 23]), ([33], [0])])
def test_triton_prefill_reads_fp8(new, cached, dtype):
    TritonAttention, tiles = _triton()
    b = Fp8Batch(new, cached, True, dtype, seed=len(new))
    ours, ref = b.attend(TritonAttention(tiles=tiles)), b.attend(TorchAttention())
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_reads_fp8(num_splits, dtype):
    TritonAttention, tiles = _triton()
    lengths = [1, 9, 40, 77, 16]
    b = Fp8Batch([1] * 5, [n - 1 for n in lengths], False, dtype, seed=num_splits)
    ours = b.attend(TritonAttention(tiles=tiles), num_splits=num_splits)
    torch.testing.assert_close(
        ours, b.attend(TorchAttention()), atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3
    )


# ------------------------------------------------------------------------ models
def calibrate(model: FlashQwenForCausalLM, prompts: list[list[int]], margin: float = 2.0) -> torch.Tensor:
    """Per-layer [k, v] scales from a prefill of `prompts` into an unscaled scratch cache of exactly their
    tokens (what Engine.warmup does); the model's own KV scales are left as they were."""
    c = model.config
    saved = [attn.kv_scales for attn in model.attention_layers()]
    model.set_kv_scales(None, None)
    scratch = KVCache(
        c.num_hidden_layers,
        sum(map(len, prompts)),
        1,
        c.num_attention_heads,
        c.head_dim,
        model.dtype,
        torch.device("cpu"),
    )
    Runner(model, None, torch.device("cpu")).forward_no_cache(
        [len(p) for p in prompts], sum(prompts, []), [1.0] * len(prompts), scratch
    )
    for attn, s in zip(model.attention_layers(), saved):
        attn.kv_scales = s
    amax = scratch.amax()
    assert (amax > 0).all()
    return scales_from_amax(amax, margin)


def test_calibration_takes_max_post_rope_k_and_v(tmp_path):
    """The calibrated scales come from each layer's max |K| after RoPE and max |V| over every prompt token:
    the float64 reference's maxima, within fp32 rounding."""
    from reference import ref_forward

    state = random_checkpoint(TINY, 3)
    model = FlashQwenForCausalLM.from_pretrained(
        write_checkpoint(str(tmp_path / "ckpt"), TINY, state), dtype=torch.float32, progress=False
    )
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 7, 30)]  # <= seq_length: alpha 1
    amax = torch.zeros(TINY["num_hidden_layers"], 2, dtype=torch.float64)
    for p in prompts:
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        ref_forward(state, TINY, p, kv_out=kv)
        for i, (k, v) in enumerate(kv):
            amax[i] = torch.maximum(amax[i], torch.stack([k.abs().max(), v.abs().max()]))
    torch.testing.assert_close(calibrate(model, prompts, 1.5), scales_from_amax(amax.float(), 1.5), rtol=1e-5, atol=0)


def fp8_paged(model: FlashQwenForCausalLM, scales: torch.Tensor, seed: int = 0) -> Paged:
    paged = Paged(model, seed=seed, kv_dtype=FP8)
    paged.cache.set_scales(scales[:, 0], scales[:, 1])
    return paged


def test_tiny_model_fp8_cache_against_fp32_cache(tmp_path):
    cfg = TINY
    path = write_checkpoint(str(tmp_path / "ckpt"), cfg, random_checkpoint(cfg, 0))
    model = FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 6, 13, 29)]
    scales = calibrate(model, [torch.randint(0, 256, (24,), generator=g).tolist()])  # other text than served
    runs = {"fp32": Paged(model, seed=1), "fp8": fp8_paged(model, scales, seed=1)}
    seqs = {name: [list(p) for p in prompts] for name in runs}
    worst, agree, total, spread = 0.0, 0, 0, 0.0
    outs = {name: r.step([0, 1, 2, 3], prompts, [0] * 4, [1.0] * 4, prefill=True) for name, r in runs.items()}
    for _ in range(16):
        for a, b in zip(outs["fp32"], outs["fp8"]):
            worst = max(worst, (a - b).abs().max().item())
            spread = max(spread, a.abs().max().item())
        for name in runs:  # each run follows the fp32 run's greedy tokens, so the contexts stay equal
            for s, o in zip(seqs[name], outs["fp32"]):
                s.append(int(o[-1].argmax()))
        agree += sum(int(a[-1].argmax()) == int(b[-1].argmax()) for a, b in zip(outs["fp32"], outs["fp8"]))
        total += 4
        outs = {
            name: r.step([0, 1, 2, 3], seqs[name], [len(s) - 1 for s in seqs[name]], [1.0] * 4, prefill=False)
            for name, r in runs.items()
        }
    print(
        f"\ntiny model: max |logit fp8 - fp32| = {worst:.4f} (|logits| up to {spread:.2f}), "
        f"greedy agreement {agree}/{total}, k scales {scales[:, 0].tolist()}, v scales {scales[:, 1].tolist()}"
    )
    assert worst < 0.15 and agree >= total - 2


# ------------------------------------------------------------------------ scales: checkpoint and Warmup
def _engine(model_dir: str, kv_dtype: torch.dtype) -> Engine:
    from worker.tokenizer import QwenTokenizer

    model = FlashQwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, progress=False)
    tok = QwenTokenizer.from_dir(model_dir)
    cfg = EngineConfig(kv_cache_dtype=kv_dtype, max_total_tokens=4096, shard_block_fraction=0.5, cuda_graphs=False)
    return Engine(model, tok, ParallelContext(), cfg)


def _request(rid: int, text: str, max_new: int, ignore_eos: bool = False, logprobs: bool = False) -> pb.Request:
    return pb.Request(
        id=rid,
        inputs=text,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_p=1.0, typical_p=1.0, repetition_penalty=1.0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=ignore_eos),
        prefill_logprobs=logprobs,
    )


WARMUP_TEXT, WARMUP_MAX_INPUT = "The capital of France is " * 4, 64


def _warmup(engine: Engine, text: str = WARMUP_TEXT) -> int:
    batch = pb.Batch(id=0, requests=[_request(0, text, 8)], size=1)
    return engine.warmup(
        pb.WarmupRequest(batch=batch, max_input_length=WARMUP_MAX_INPUT, max_prefill_tokens=64, max_new_tokens=8)
    )


def test_checkpoint_scales_are_used_and_not_recalibrated(tmp_path, demo_dir):
    import shutil

    from safetensors.torch import save_file

    src = os.path.join(demo_dir, "model")
    dst = str(tmp_path / "model")
    shutil.copytree(src, dst)
    n = FlashQwenForCausalLM.from_pretrained(src, progress=False).config.num_hidden_layers
    extra = {
        f"transformer.h.{i}.attn.{w}_scale": torch.tensor(0.01 * (i + 1) + (w == "v") * 0.001)
        for i in range(n)
        for w in "kv"
    }
    save_file(extra, os.path.join(dst, "kv_scales.safetensors"))
    os.remove(os.path.join(dst, "model.safetensors.index.json"))  # no index: every *.safetensors file is read
    engine = _engine(dst, FP8)
    _warmup(engine)
    assert engine.calibrated_kv_scales is None
    assert engine.kv.k_scales.tolist() == pytest.approx([0.01 * (i + 1) for i in range(n)])
    assert engine.kv.v_scales.tolist() == pytest.approx([0.01 * (i + 1) + 0.001 for i in range(n)])
    attn = engine.model.transformer.h[1].attn
    assert attn.kv_scales is not None and float(attn.kv_scales[1]) == pytest.approx(0.021)


def _generate(engine: Engine, texts: list[str], max_new: int, ignore_eos: bool = False) -> list[list[int]]:
    """Greedy generation of a batch through Prefill/Decode; each request's generated ids."""
    reqs = [_request(i, t, max_new, ignore_eos) for i, t in enumerate(texts)]
    out: dict[int, list[int]] = {i: [] for i in range(len(texts))}
    gens, batch = engine.prefill(pb.Batch(id=1, requests=reqs, size=len(reqs)), None)
    while True:
        for gen in gens:
            out[gen.request_id] += list(gen.next_tokens.ids)
        if batch is None:
            return [out[i] for i in range(len(texts))]
        gens, batch = engine.decode([batch.to_pb(pb)])


def _loss(engine: Engine, texts: list[str]) -> float:
    """Mean next-token NLL over each whole text, from prefill logprobs (computed over the KV cache)."""
    reqs = [_request(i, t, 1, logprobs=True) for i, t in enumerate(texts)]
    gens, _ = engine.prefill(pb.Batch(id=2, requests=reqs, size=len(reqs)), None)
    lps: list[float] = []
    for gen in gens:
        assert gen.prefill_tokens is not None
        lps += list(gen.prefill_tokens.logprobs)[1:]  # the first token has none
    return -sum(lps) / len(lps)


@pytest.fixture(scope="module")
def demo_engines(demo_dir):
    model_dir = os.path.join(demo_dir, "model")
    engines = {
        "fp32": _engine(model_dir, torch.float32),
        "bf16": _engine(model_dir, torch.bfloat16),
        "fp8": _engine(model_dir, FP8),
    }
    for e in engines.values():
        _warmup(e)
    return engines


def test_warmup_calibrates_fp8_scales(demo_engines):
    e = demo_engines["fp8"]
    k, v = e.calibrated_kv_scales
    warm = e.tokenizer.encode(WARMUP_TEXT)[-WARMUP_MAX_INPUT:]  # the prompt _warmup sends, as the shard cuts it
    expected = calibrate(e.model, [warm], e.cfg.kv_scale_margin)
    assert torch.equal(k, expected[:, 0]) and torch.equal(v, expected[:, 1])
    assert e.kv.is_fp8 and torch.equal(e.kv.k_scales, k) and torch.equal(e.kv.v_scales, v)
    assert (k > 1e-6).all() and (k != 1.0).all() and (v != 1.0).all()
    attn = e.model.transformer.h[0].attn
    assert attn.kv_scales[0].data_ptr() == e.kv.k_scales.data_ptr()  # a view: updates reach the layers
    assert demo_engines["fp32"].model.transformer.h[0].attn.kv_scales is None  # unscaled caches: no scales
    print(f"\ndemo model calibrated scales (margin 2): k {k.tolist()}, v {v.tolist()}")


def test_demo_model_reproduces_training_sentences_with_fp8_kv(demo_engines):
    from make_demo_model import BASE_TEXTS

    engine = demo_engines["fp8"]
    prompts = [p for p, _ in BASE_TEXTS]
    out = _generate(engine, prompts, 40)
    for ids, (_, continuation) in zip(out, BASE_TEXTS):
        assert ids[-1] == engine.tokenizer.endoftext_id
        assert engine.tokenizer.decode(ids, skip_special_tokens=True) == continuation


def test_demo_model_greedy_agreement_and_loss_fp8_vs_fp32(demo_engines):
    from make_demo_model import BASE_TEXTS

    prompts = [p for p, _ in BASE_TEXTS]
    ref = _generate(demo_engines["fp32"], prompts, 32, ignore_eos=True)
    ours = _generate(demo_engines["fp8"], prompts, 32, ignore_eos=True)
    agree = sum(a == b for r, o in zip(ref, ours) for a, b in zip(r, o))
    first_diff = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), 32) for r, o in zip(ref, ours)]
    texts = [p + c for p, c in BASE_TEXTS]
    losses = {name: _loss(demo_engines[name], texts) for name in ("fp32", "bf16", "fp8")}
    print(
        f"\ndemo greedy agreement fp8 vs fp32 over 32 tokens: {agree}/{32 * len(prompts)}, first divergence "
        f"per prompt {first_diff}; loss on the training text: " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items())
    )
    assert agree >= 0.9 * 32 * len(prompts)  # measured: all 192 (the sentences themselves: the test above)
    assert abs(losses["fp8"] - losses["fp32"]) <= 0.1 * losses["fp32"] + 1e-3


def test_engine_sizes_twice_the_kv_tokens_with_fp8(demo_engines, monkeypatch):
    """Memory sizing after Warmup (the GPU path, with the CUDA memory queries faked): the same free memory
    holds twice the blocks in fp8 as in bf16."""
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    blocks = {}
    for name in ("bf16", "fp8"):
        e = demo_engines[name]
        monkeypatch.setattr(e, "pctx", ParallelContext(device=torch.device("cuda")))
        monkeypatch.setattr(e.cfg, "max_total_tokens", 0)
        blocks[name] = e._blocks_from_memory(activation_peak=2**30)
    assert blocks["fp8"] in (2 * blocks["bf16"], 2 * blocks["bf16"] + 1)
