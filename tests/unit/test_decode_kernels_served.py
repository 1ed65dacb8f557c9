"""The served decode kernel choices (issue 17, P1): `serve --decode-kernels` defaults to the set measured faster
on an H200 (pdl, rope_store, lora_pdl, lora_act_shrink, gptq_cuda, lora_term_first, lora_norm_shrink, lora_k_lanes,
gptq_mma, gptq_act, gptq_tc, gptq_act_out, attn_cuda, gptq_tiled, norm_fold), `none` turns them off, a bad name is
refused naming it; `where_applies` keeps what changes anything on the shard's device; serve builds the model with
them, down to every layer and the attention backend (the paged decode's PDL)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import pytest
import torch

from worker import cli
from worker.layers.decode_kernels import DecodeKernels, where_applies

MEASURED = DecodeKernels(
    pdl=True,
    rope_store=True,
    lora_pdl=True,
    lora_act_shrink=True,
    gptq_cuda=True,
    lora_term_first=True,
    lora_norm_shrink=True,
    lora_k_lanes=True,
    gptq_mma=True,
    gptq_act=True,
    gptq_tc=True,
    gptq_act_out=True,
    attn_cuda=True,
    gptq_tiled=True,
    norm_fold=True,
)


def _parse(*flags: str) -> DecodeKernels:
    return cli.build_parser().parse_args(["serve", "model", *flags]).decode_kernels


def test_the_flag_defaults_to_the_measured_set_and_none_turns_it_off():
    assert _parse() == MEASURED
    assert _parse("--decode-kernels", "none") == DecodeKernels()
    assert _parse("--decode-kernels", "act_gemv, pdl") == DecodeKernels(pdl=True, act_gemv=True)
    assert MEASURED.describe() == (
        "pdl,rope_store,lora_pdl,lora_act_shrink,gptq_cuda,lora_term_first,lora_norm_shrink,lora_k_lanes,gptq_mma,"
        "gptq_act,gptq_tc,gptq_act_out,attn_cuda,gptq_tiled,norm_fold"
    )
    assert DecodeKernels().describe() == "none"


@pytest.mark.parametrize("value", ["pdl,fast", "", "none,pdl", "pdl,norm_gemv"])
def test_a_bad_decode_kernels_value_is_refused_naming_it(value, capsys):
    with pytest.raises(SystemExit):
        _parse("--decode-kernels", value)
    err = capsys.readouterr().err
    assert f"--decode-kernels: decode kernels {value!r}" in err and "pdl, act_gemv, rope_store" in err


@pytest.mark.parametrize(("interpreted", "major", "expected"), [
    (False, 9, MEASURED),
    (False, 8, replace(MEASURED, pdl=False, lora_pdl=False, attn_cuda=False)),  # no PDL, no clusters before sm_90
    (True, 9, DecodeKernels()),  # the interpreter's path is unchanged
])  # fmt: skip
def test_where_applies(monkeypatch, interpreted, major, expected):
    from worker.kernels import pdl

    monkeypatch.setattr(pdl, "INTERPRETED", interpreted)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert where_applies(MEASURED, torch.device("cuda", 0)) == expected
    assert where_applies(DecodeKernels(), torch.device("cuda", 0)) == DecodeKernels()
    assert where_applies(MEASURED, torch.device("cpu")) == DecodeKernels()
    # the torch attention backend runs no fused kernels: RoPE + store has nothing to replace there
    assert where_applies(MEASURED, torch.device("cuda", 0), fused=False) == replace(
        expected, rope_store=False, attn_cuda=False
    )


class _Built(Exception):
    """Stops serve once the model is built."""


@pytest.mark.parametrize(("flags", "expected"), [([], MEASURED), (["--decode-kernels", "none"], DecodeKernels())])
def test_serve_builds_the_model_with_the_flags_kernels(demo_dir, monkeypatch, caplog, tmp_path, flags, expected):
    """Every layer that takes DecodeKernels holds the flag's (where_applies as on an H200), the triton backend's
    paged decode its pdl, and the choice is logged."""
    from worker.layers import decode_kernels
    from worker.models.qwen import FlashQwenForCausalLM

    monkeypatch.setattr(decode_kernels, "where_applies", lambda opts, device, fused: opts)
    built: list[FlashQwenForCausalLM] = []
    load = FlashQwenForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        built.append(load(*args, progress=False, **kwargs))
        raise _Built

    monkeypatch.setattr(FlashQwenForCausalLM, "from_pretrained", spy)
    model_dir = os.path.join(demo_dir, "model")
    argv = ["serve", model_dir, "--device", "cpu", "--uds-path", str(tmp_path / "s"), "--attention-backend", "triton"]
    args = cli.build_parser().parse_args(argv + flags)
    with caplog.at_level(logging.INFO, logger="worker"), pytest.raises(_Built):
        cli.serve(args, {})
    (model,) = built
    takers = [m for m in model.modules() if hasattr(m, "set_decode_kernels")]
    held = [m.decode_kernels if hasattr(m, "decode_kernels") else m.opts for m in takers if not _setter_only(m)]
    assert len(held) == 5 * model.config.num_hidden_layers  # 4 linears and Rotary a layer
    assert all(h == expected for h in held), held
    assert model.backend.pdl is expected.pdl
    logged = [r.getMessage() for r in caplog.records]
    assert f"decode kernels: {expected.describe()} (asked: {expected.describe()})" in logged


def _setter_only(module: torch.nn.Module) -> bool:
    """Layers that turn the choice into their kernel at once (norms, SiLU-mul, attention) keep no copy."""
    return not hasattr(module, "decode_kernels") and not hasattr(module, "opts")
