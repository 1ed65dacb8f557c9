"""The GPTQ packer/dequantizer (worker/quant/gptq_format.py) and config parsing, against an independent
implementation written here from the format description (spec/quantization.md), in plain Python ints."""

from __future__ import annotations

import json

import pytest
import torch

from worker.config import ConfigError
from worker.quant import gptq_format as fmt
from worker.quant.config import FP8Config, GPTQConfig, choose, read_gptq


# ------------------------------------------------------------------ the independent implementation
def ind_unpack_along_k(qweight: list[list[int]], bits: int) -> list[list[int]]:
    """qweight [K·bits/32][N] words -> q [K][N]: row r·P + j is in bits [bits·j, bits·(j+1)) of word r."""
    P, mask = 32 // bits, (1 << bits) - 1
    out = []
    for r, row in enumerate(qweight):
        for j in range(P):
            out.append([((w & 0xFFFFFFFF) >> (bits * j)) & mask for w in row])
            assert len(out) == r * P + j + 1
    return out


def ind_unpack_along_n(qzeros: list[list[int]], bits: int) -> list[list[int]]:
    P, mask = 32 // bits, (1 << bits) - 1
    return [[((w & 0xFFFFFFFF) >> (bits * j)) & mask for w in row for j in range(P)] for row in qzeros]


def ind_dequantize(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """w[k][n] = (q − (z_stored + 1)) · s, group looked up through g_idx; float64 [K, N]."""
    q = ind_unpack_along_k(qweight.tolist(), bits)
    z = ind_unpack_along_n(qzeros.tolist(), bits)
    s = scales.double().tolist()
    g = g_idx.tolist()
    rows = [[(q[k][n] - (z[g[k]][n] + 1)) * s[g[k]][n] for n in range(len(q[0]))] for k in range(len(q))]
    return torch.tensor(rows, dtype=torch.float64)


def ind_pack_along_k(q: list[list[int]], bits: int) -> torch.Tensor:
    P = 32 // bits
    words = []
    for r in range(len(q) // P):
        row = []
        for n in range(len(q[0])):
            w = 0
            for j in range(P):
                w |= q[r * P + j][n] << (bits * j)
            row.append(w - (1 << 32) if w >= 1 << 31 else w)  # stored as signed int32
        words.append(row)
    return torch.tensor(words, dtype=torch.int32)


# ------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_and_unpack_match_the_description(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (48, 24), generator=g)
    packed = fmt.pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (48 * bits // 32, 24)
    assert torch.equal(packed, ind_pack_along_k(q.tolist(), bits))
    assert torch.equal(fmt.unpack_rows(packed, bits), q.to(torch.int32))
    # along N (qzeros): the transpose of the same rule
    assert torch.equal(fmt.pack_cols(q.t(), bits), ind_pack_along_k(q.tolist(), bits).t())
    assert fmt.unpack_cols(fmt.pack_cols(q.t(), bits), bits).tolist() == q.t().tolist()


def test_sym_int4_zero_words_are_0x77777777():
    quant = fmt.quantize_rtn(torch.randn(16, 32), 4, 16, sym=True)
    assert {w & 0xFFFFFFFF for w in quant.qzeros.flatten().tolist()} == {0x77777777}
    quant8 = fmt.quantize_rtn(torch.randn(16, 32), 8, 16, sym=True)
    assert {w & 0xFFFFFFFF for w in quant8.qzeros.flatten().tolist()} == {0x7F7F7F7F}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [16, 40, -1])
def test_quantize_then_dequantize_against_the_independent_reader(bits, sym, act_order, group_size):
    """The project's quantizer writes tensors the independent reader decodes to what the project's
    dequantizer computes, and the weights are within about half a step of the float weights."""
    g = torch.Generator().manual_seed(7)
    n, k = 16, 88  # 88 rows: 40 leaves a short last group; -1: one group
    w = torch.randn(n, k, generator=g) * 0.05
    perm = torch.randperm(k, generator=g) if act_order else None
    quant = fmt.quantize_rtn(w, bits, group_size, sym, perm)
    groups = 1 if group_size == -1 else -(-k // group_size)
    assert quant.qweight.shape == (k * bits // 32, n) and quant.qzeros.shape == (groups, n * bits // 32)
    assert quant.scales.shape == (groups, n) and quant.scales.dtype == torch.float16
    assert quant.g_idx.shape == (k,) and quant.g_idx.dtype == torch.int32
    if act_order:
        assert sorted(quant.g_idx.tolist()) == sorted(
            (torch.arange(k) // (group_size if group_size > 0 else k)).tolist()
        )
        assert group_size == -1 or not torch.equal(quant.g_idx, fmt.default_g_idx(k, group_size))
    else:
        assert torch.equal(quant.g_idx, fmt.default_g_idx(k, group_size))
    ref = ind_dequantize(quant.qweight, quant.qzeros, quant.scales, quant.g_idx, bits)  # [K, N]
    ours = fmt.dequantize(quant.qweight, quant.qzeros, quant.scales, quant.g_idx, bits, dtype=torch.float64)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-7 * ref.abs().max().item())
    step = quant.scales.double()[quant.g_idx.long()]  # [K, N]
    # half a step, plus the fp16 rounding of the scale (relative 2^-11) carried over |w| / step steps
    wt = w.t().double()
    assert ((ref - wt).abs() <= 0.5 * step + wt.abs() * 2**-10).all()


def test_dequantize_reads_g_idx_not_row_order():
    """A checkpoint whose g_idx permutes groups is dequantized through g_idx (act order)."""
    bits, k, n = 4, 16, 8
    q = torch.randint(0, 16, (k, n))
    zeros = torch.randint(0, 15, (2, n))
    scales = torch.rand(2, n, dtype=torch.float16) + 0.5
    g_idx = torch.tensor([1, 0] * 8, dtype=torch.int32)
    qw, qz = fmt.pack_rows(q, bits), fmt.pack_cols(zeros, bits)
    ref = ind_dequantize(qw, qz, scales, g_idx, bits)
    assert torch.equal(fmt.dequantize(qw, qz, scales, g_idx, bits, dtype=torch.float64), ref)


# ------------------------------------------------------------------ config
def _write(tmp_path, config: dict, quantize_config: dict | None = None) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if quantize_config is not None:
        (tmp_path / "quantize_config.json").write_text(json.dumps(quantize_config))
    return str(tmp_path)


QWEN_INT4 = dict(
    bits=4, group_size=128, damp_percent=0.01, desc_act=False, static_groups=False, sym=True, true_sequential=True
)


def test_config_from_config_json_and_from_quantize_config_json(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    cfg = read_gptq(_write(a, {"quantization_config": {**QWEN_INT4, "quant_method": "gptq"}}))
    assert cfg == GPTQConfig(4, 128, True, False, "gptq", cfg.source if cfg else "") and cfg.zero_offset == 1
    b = tmp_path / "b"
    b.mkdir()
    cfg = read_gptq(_write(b, {}, {**QWEN_INT4, "bits": 8, "group_size": -1, "desc_act": True, "sym": False}))
    assert cfg is not None and (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym) == (8, -1, True, False)
    assert cfg.groups(13696) == 1 and GPTQConfig(4, 128, True, False).groups(13696) == 107


def test_v2_checkpoint_format_is_served_with_true_zeros(tmp_path):
    cfg = read_gptq(_write(tmp_path, {"quantization_config": {**QWEN_INT4, "checkpoint_format": "gptq_v2"}}))
    assert cfg is not None and cfg.zero_offset == 0


@pytest.mark.parametrize(
    ("qc", "needle"),
    [
        ({**QWEN_INT4, "bits": 3}, "bits must be 4 or 8, got 3"),
        ({**QWEN_INT4, "group_size": 0}, "group_size"),
        ({**QWEN_INT4, "quant_method": "awq"}, "quant_method 'awq'"),
        ({**QWEN_INT4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
        ({**QWEN_INT4, "sym": "yes"}, "sym must be true or false"),
    ],
)
def test_bad_quantization_config_is_refused_naming_the_key(tmp_path, qc, needle):
    with pytest.raises(ConfigError, match=needle):
        read_gptq(_write(tmp_path, {"quantization_config": qc}))


def test_quantize_flag_against_the_checkpoint(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    _write(plain, {})
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    _write(gptq, {"quantization_config": QWEN_INT4})
    assert choose(str(plain), "auto") is None
    assert isinstance(choose(str(plain), "fp8"), FP8Config)
    assert isinstance(choose(str(gptq), "auto"), GPTQConfig)  # gptq is implied by the config
    assert isinstance(choose(str(gptq), "gptq"), GPTQConfig)
    with pytest.raises(ConfigError, match="no quantization_config"):
        choose(str(plain), "gptq")
    with pytest.raises(ConfigError, match="floating-point checkpoint"):
        choose(str(gptq), "fp8")
