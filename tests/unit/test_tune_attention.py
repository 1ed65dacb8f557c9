"""scripts/tune_attention.py (the GPU sweep of the attention kernels' knobs) on the CPU: the whole script in
--smoke mode (tiny shapes, the Triton interpreter), and its guard: a config whose output is wrong is
recorded as failed and never timed or picked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

if "worker.kernels.triton_attention" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels already compiled for the GPU in this session", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import torch  # noqa: E402

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import tune_decode  # noqa: E402
import tune_prefill  # noqa: E402
from tune_attention import Sweep  # noqa: E402
from tune_cases import DecodeCase, PrefillCase, Shape  # noqa: E402
from worker.kernels.triton_attention import Tiles  # noqa: E402

SHAPE = Shape(heads=2, head_dim=16, block=4)


def sweep() -> Sweep:
    return Sweep(torch.device("cpu"), SHAPE, torch.float16, 1e9, 1e9, 2, time.monotonic() + 600, 0, True, True)


def test_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "scripts/tune_attention.py", "--smoke", "--kv", "fp8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["decode"]["fp8"]["rows"]
    assert [(r["ctx"], r["batch"]) for r in rows] == [(7, 1), (7, 3), (40, 1), (40, 3)]
    passed = {
        (m["ctx"], m["batch"], m["tiles"], m["splits"])
        for m in res["measurements"]
        if m["kind"] == "decode" and "ms" in m
    }
    for r in rows:  # each row's best is a measured, checked config
        assert (r["ctx"], r["batch"], r["tiles"], r["splits"]) in passed
    assert all(m.get("err") is not None and m["err"] <= 1.0 for m in res["measurements"])
    assert res["decode"]["fp8"]["policy"]["tiles"].startswith("decode_n=")
    assert set(res["prefill"]) == {"9+17", "33"}  # bf16 no-cache and paged, fp8 paged
    assert any("fp8" in r["config"] for r in res["prefill"]["33"])


def test_wrong_decode_config_is_recorded_and_never_timed(monkeypatch):
    sw = sweep()
    case = DecodeCase.build(40, 3, "bf16", SHAPE, sw.device, 0, torch.float16)
    tiles = Tiles(decode_n=8)
    memo: dict = {}
    assert tune_decode.measure(sw, case, tiles, 2, memo) is not None  # the real kernel passes
    real = tune_decode.paged_decode

    def off_by_a_bit(*args, **kw):
        return real(*args, **kw) * 1.1

    monkeypatch.setattr(tune_decode, "paged_decode", off_by_a_bit)
    assert tune_decode.measure(sw, case, tiles, 3, memo) is None
    bad = sw.results[-1]
    assert bad["error"] == "wrong result" and bad["err"] > 1.0 and "ms" not in bad


def test_wrong_prefill_config_is_recorded():
    sw = sweep()
    case = PrefillCase.build([9, 17], "bf16", SHAPE, sw.device, torch.float16)
    run = tune_prefill.triton_run(case, Tiles(prefill_m=16, prefill_n=16), True)
    assert tune_prefill.measure(sw, case, "ok", run, True) is not None
    assert "ms" in sw.results[-1]
    assert tune_prefill.measure(sw, case, "bad", lambda: run() * 1.1, True) is None
    assert sw.results[-1]["error"] == "wrong result" and "ms" not in sw.results[-1]


def test_parse_prefill_cases():
    assert tune_prefill.parse_cases("32768;1024x8") == [[32768], [1024] * 8]
    assert tune_prefill.case_name([1024] * 8) == "1024x8" and tune_prefill.case_name([5, 7]) == "5+7"


def test_default_kernels_compile_for_sm90_without_spills():
    """scripts/tune_compile.py --defaults: Tiles()'s decode and prefill kernels compile for sm_90 with
    Triton's bundled ptxas (no GPU needed), spill at most a few bytes (scripts/tune_compile.py's SPILL_OK, which
    the measured-fastest fp8-cache prefill tiles need) and fit in shared memory (exit status 0)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "scripts/tune_compile.py", "--defaults"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("default ") == 5 and "SPILLS" not in proc.stdout  # decode + 2 prefill, x bf16/fp8
