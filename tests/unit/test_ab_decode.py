"""scripts/ab_decode.py (the GPU A/B of decode-step variants in one process) on the CPU: how a variant's settings
are read (which library a directory of edited sources replaces, the files taken from it), the clear errors for bad
ones, and that a variant's settings hold inside its block and the defaults come back after it, an exception too."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import ab_decode  # noqa: E402

KERNELS = os.path.join(ROOT, "worker", "kernels")


def _dir(tmp_path, name: str, *files: str) -> str:
    d = tmp_path / name
    d.mkdir()
    for f in files:
        (d / f).write_text("// an edited copy\n")
    return str(d)


def test_a_variant_s_sources_come_from_its_directory_where_it_has_them(tmp_path):
    attn = _dir(tmp_path, "attn", "paged_decode.cu")
    gemv = _dir(tmp_path, "gemv", "gptq_tc.cu", "gptq_cuda.cuh")
    v = ab_decode.parse_variant(
        f"new:src={attn},src={gemv},form1=4x2,long2=1024,tiles=decode_n=64;decode_lanes=1,kernels=pdl+gptq_tc,"
        "set=gemv_cuda.TC_LONG_K=2,plan=4096x4096=4x2,plan=22016x4096=2"
    )
    assert v.name == "new"
    assert v.src["paged_decode"] == ((f"{attn}/paged_decode.cu",), (f"{KERNELS}/gptq_cuda.cuh",))
    sources, headers = v.src["gptq_gemv"]
    assert sources == (f"{KERNELS}/gptq_gemv.cu", f"{KERNELS}/gptq_mma.cu", f"{gemv}/gptq_tc.cu")
    assert headers == (f"{gemv}/gptq_cuda.cuh",)
    assert (v.forms, v.long, v.tiles) == ({1: (4, 2)}, {2: 1024}, "decode_n=64,decode_lanes=1")
    assert v.kernels == "pdl,gptq_tc"
    assert v.consts == {("gemv_cuda", "TC_LONG_K"): 2}
    assert v.plans == {(4096, 4096): (4, 2), (22016, 4096): (2, 0)}
    assert ab_decode.parse_variant("served") == ab_decode.Variant("served")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("a:kernel=x", "unknown setting 'kernel'"),
        ("a:kernels=pdl+gptq_fast", "gptq_fast"),
        ("a:form1=4", "a form is SPLITSxDEPTH"),
        ("a:long1", "is not key=value"),
        (":form1=4x2", "no name"),
        ("a:src={empty}", "no library"),
        ("a:src={both}", "['gptq_gemv', 'paged_decode']"),
        ("a:set=gemv_cuda.TC_LONG_K", "set is MODULE.NAME=INTEGER"),
        ("a:set=gemv_cuda.TC_LONG_K=x", "set is MODULE.NAME=INTEGER"),
        ("a:set=gemv_cuda.NOT_THERE=1", "no integer NOT_THERE"),
        ("a:set=gemv_cuda.SOURCES=1", "no integer SOURCES"),
        ("a:set=no_such.X=1", "no module worker.kernels.no_such"),
        ("a:plan=4096x4096", "plan is NxK=WxS"),
        ("a:plan=4096=4x2", "plan is NxK=WxS"),
        ("a:plan=4096x4096=4x0", "plan is NxK=WxS"),
        ("a:plan=4096x4096=4x2x1", "plan is NxK=WxS"),
        ("a:plan=4096x4096=4x2,plan=4096x4096=8", "a second plan for 4096x4096"),
        ("a:set=gemv_cuda.TC_LONG_K=--3", "set is MODULE.NAME=INTEGER"),
    ],
)
def test_bad_variants_are_refused_naming_what_is_wrong(tmp_path, spec, message):
    empty, both = _dir(tmp_path, "empty"), _dir(tmp_path, "both", "paged_decode.cu", "gptq_tc.cu")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ab_decode.parse_variant(spec.format(empty=empty, both=both))


def test_a_variant_holds_in_its_block_and_the_defaults_come_back(tmp_path):
    from worker.kernels import gemv_cuda
    from worker.kernels import paged_decode_cuda as pdc
    from worker.kernels.triton_attention import Tiles

    defaults = (pdc.FORMS, pdc.LONG_CONTEXT, pdc.SOURCES, pdc.HEADERS, gemv_cuda.SOURCES, gemv_cuda.HEADERS)
    long_k = gemv_cuda.TC_LONG_K
    attn = _dir(tmp_path, "attn", "paged_decode.cu")
    v = ab_decode.parse_variant(
        f"v:src={attn},form2=4x4,long1=100,tiles=decode_n=64,set=gemv_cuda.TC_LONG_K=-3,plan=4096x4096=4x3,"
        "plan=22016x4096=2"
    )
    plan_tc, plan_tc_pair = gemv_cuda.plan_tc, gemv_cuda.plan_tc_pair
    backend = SimpleNamespace(tiles=Tiles())
    for fail in (False, True):
        with pytest.raises(RuntimeError) if fail else ab_decode.contextlib.nullcontext():
            with ab_decode.applied(v, backend):
                assert pdc.SOURCES == (f"{attn}/paged_decode.cu",) and gemv_cuda.SOURCES == defaults[4]
                assert pdc.form_for(2) == (4, 4) and pdc.form_for(1) == defaults[0][1]
                assert pdc.LONG_CONTEXT == {**defaults[1], 1: 100}
                assert backend.tiles == Tiles(decode_n=64)
                assert gemv_cuda.TC_LONG_K == -3
                assert gemv_cuda.plan_tc(4096, 4096, 132, 1, False) == (11, 3, 4)  # 32 chunks: 11, 11, 10
                assert gemv_cuda.plan_tc(12288, 4096, 132, 1, False) == plan_tc(12288, 4096, 132, 1, False)
                assert gemv_cuda.plan_tc_pair(22016, 4096, 132) == 2
                assert gemv_cuda.plan_tc_pair(11008, 4096, 132) == plan_tc_pair(11008, 4096, 132)
                if fail:
                    raise RuntimeError("a variant's run failed")
        assert (pdc.FORMS, pdc.LONG_CONTEXT, pdc.SOURCES, pdc.HEADERS, gemv_cuda.SOURCES, gemv_cuda.HEADERS) == defaults
        assert backend.tiles == Tiles()
        assert gemv_cuda.TC_LONG_K == long_k
        assert (gemv_cuda.plan_tc, gemv_cuda.plan_tc_pair) == (plan_tc, plan_tc_pair)


def _launch_methods():
    from worker.layers.quantized import _GPTQ
    from worker.models import qwen

    return {
        "c_attn": (_GPTQ, "forward_scaled"),
        "attention": (qwen.FlashQwenAttention, "attend"),
        "attn.c_proj": (qwen.FlashQwenAttention, "forward_norm"),
        "gate_up": (qwen.QwenMLP, "act_deferred"),
        "mlp.c_proj": (qwen.QwenMLP, "forward_norm"),
    }


def _calls(dtype):
    """For each launch: (the object its method is called on, the call's arguments, a check of what the stand-in
    returns): what the norm-folded decode passes there (a Deferred x of 2 rows of 256) and returns (shape, dtype,
    contiguous rows, the norm's eps, the residual as the sum, fp32 squares)."""
    import torch

    from worker.layers.norm import Deferred

    x = Deferred(torch.zeros(2, 256, dtype=dtype), torch.zeros(2, 8), 1e-5)
    residual, norm = torch.ones(2, 256, dtype=dtype), SimpleNamespace(eps=1e-6)
    qkv = torch.arange(2 * 768.0).view(2, 768).to(dtype)

    def folded(out):
        deferred, s = out
        assert deferred.x.shape == (2, 256) and deferred.x.dtype == dtype and deferred.x.is_contiguous()
        assert deferred.squares.shape[0] == 2 and deferred.squares.dtype == torch.float32
        assert deferred.eps == norm.eps and s is residual

    def plain(shape):
        def check(out):
            assert out.shape == shape and out.dtype == dtype and out.is_contiguous()

        return check

    def qs(out):  # the first 256 values of each row of c_attn's output, as [2, 256] rows
        assert torch.equal(out, qkv.reshape(-1)[:512].view(2, 256))

    attn = SimpleNamespace(c_attn=SimpleNamespace(forward_scaled=lambda d: qkv), num_heads=2, head_dim=128)
    return {
        "c_attn": (SimpleNamespace(scales=torch.zeros(2, 768)), (x,), plain((2, 768))),
        "attention": (attn, (x, None, None), qs),
        "attn.c_proj": (SimpleNamespace(attend=lambda x, ctx, kv: torch.zeros(2, 256, dtype=dtype)),
                        (x, None, None, norm, residual), folded),
        "gate_up": (SimpleNamespace(c_proj=SimpleNamespace(qweight=torch.zeros(64, 256))), (x,), plain((2, 512))),
        "mlp.c_proj": (SimpleNamespace(act_deferred=lambda x: torch.zeros(2, 512, dtype=dtype)), (x, norm, residual),
                       folded),
    }  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_each_dropped_launch_s_stand_in_returns_what_the_launch_would(dtype):
    """Inside a variant dropping all five, each launch's method (called as the norm-folded decode calls it) returns
    the launch's output in shape, dtype and layout (wrong values); attention's from c_attn's, on layer 0's unfolded
    input too (a plain tensor through c_attn itself). After the block the model's methods are back."""
    import torch

    methods = _launch_methods()
    assert set(methods) == set(ab_decode.DROPS)
    before = {name: cls.__dict__[meth] for name, (cls, meth) in methods.items()}
    calls = _calls(getattr(torch, dtype))
    with ab_decode.applied(
        ab_decode.parse_variant("b:" + ",".join(f"drop={d}" for d in methods)), SimpleNamespace(tiles=None)
    ):
        for name, (cls, meth) in methods.items():
            owner, args, check = calls[name]
            check(cls.__dict__[meth](owner, *args))
        owner = SimpleNamespace(c_attn=lambda x, ctx: x.repeat(1, 3), num_heads=2, head_dim=128)
        layer0 = torch.arange(512.0).view(2, 256).to(getattr(torch, dtype))
        assert torch.equal(
            _attend(methods)(owner, layer0, None, None), layer0.repeat(1, 3).reshape(-1)[:512].view(2, 256)
        )
    assert all(cls.__dict__[m] is before[n] for n, (cls, m) in methods.items())


def _attend(methods):
    cls, meth = methods["attention"]
    return cls.__dict__[meth]


def test_drop_names_a_launch_fails_where_it_never_ran_and_restores_the_model():
    """drop=LAUNCH: the launches by name, an unknown one refused naming the choices; a variant whose drop never ran
    (another decode path) fails naming it; after the block (a run that failed, a drop named twice too) the model's
    methods are back."""
    import torch

    assert ab_decode.parse_variant("b:drop=attention,drop=gate_up").drops == ("attention", "gate_up")
    with pytest.raises(ValueError, match="drop 'mlp': one of c_attn, attention, attn.c_proj, gate_up, mlp.c_proj"):
        ab_decode.parse_variant("b:drop=mlp")
    methods = _launch_methods()
    before = {name: cls.__dict__[meth] for name, (cls, meth) in methods.items()}
    with pytest.raises(RuntimeError, match="drop=gate_up never ran"):
        with ab_decode.applied(ab_decode.parse_variant("b:drop=attention,drop=gate_up"), SimpleNamespace(tiles=None)):
            owner, args, _ = _calls(torch.bfloat16)["attention"]
            _attend(methods)(owner, *args)  # the attention's drop runs, gate_up's does not
    assert all(cls.__dict__[m] is before[n] for n, (cls, m) in methods.items())
    with pytest.raises(KeyError, match="a variant's run failed"):
        with ab_decode.applied(ab_decode.parse_variant("b:drop=attention,drop=attention"), SimpleNamespace(tiles=None)):
            assert _attend(methods) is not before["attention"]
            raise KeyError("a variant's run failed")
    assert all(cls.__dict__[m] is before[n] for n, (cls, m) in methods.items())
