"""Speculative decoding and GPTQ under tensor parallelism over NCCL (world size 2, and 4 with 4 GPUs), the Triton
backend and CUDA graphs, against world size 1. Ranks are real processes (tests/tp_features.py). The claims:
- prompt lookup: every rank's reported requests carry the greedy tokens of world size 1 without drafts, with
  drafts accepted (verify steps replay CUDA graphs); rank 1's chooser sees noise, so rank 0's broadcast
  choices must reach both ranks;
- Medusa heads (the demo's, column-parallel and gathered): each rank's speculative logits equal world size 1's,
  and the greedy tokens with the heads equal those without;
- GPTQ Int4 with act order (c_proj's rows split mid-group) and Int8: prefill and decode logits equal world size 1;
- GPTQ Int4 (groups of 128, sym and asym with act order) on the served decode kernels (the CUDA GEMVs: gptq_tc at 1-2
  rows, gate_up's activation from its epilogue over each rank's [gate_r | up_r]): every rank's bf16 prefill and decode
  logits at batch 1 and 2 equal world size 1's within bf16's rounding, and every layer took those kernels.

QWEN_TP_FEATURES_CPU=1 runs the same checks at world size 2 over gloo on the CPU (torch backend, no graphs).
"""

from __future__ import annotations

import os

import pytest
import torch

from tp_features import GPTQ_DTYPES, PROMPTS, SCRIPT
from tp_spawn import run_ranks

CPU = os.environ.get("QWEN_TP_FEATURES_CPU") == "1"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CPU and GPUS < 2, reason="needs 2 CUDA GPUs (QWEN_TP_FEATURES_CPU=1: gloo on the CPU)"),
]
ENV = (
    dict(QWEN_TEST_DEVICE="cpu", QWEN_TEST_BACKEND="torch")
    if CPU
    else dict(QWEN_TEST_DEVICE="cuda", QWEN_TEST_BACKEND="triton")
)
WORLDS = [2] if CPU else [w for w in (2, 4) if w <= GPUS]
Ranks = list[dict[str, torch.Tensor]]


def spawn(kind: str, out: str, world: int, *args: str) -> Ranks:
    """Each rank's results of `tests/tp_features.py KIND OUT ARGS` at world size `world`."""
    return run_ranks([SCRIPT, kind, out, *args], out, world, **ENV)


@pytest.fixture(scope="module")
def spec_runs(demo_dir, tmp_path_factory) -> dict[int, Ranks]:
    """Per world size, each rank's results: world 1 decodes plainly, larger worlds with drafts."""
    tmp = tmp_path_factory.mktemp("tp_spec")
    runs = {1: spawn("spec", str(tmp / "w1"), 1, demo_dir, "plain")}
    for w in WORLDS:
        runs[w] = spawn("spec", str(tmp / f"w{w}"), w, demo_dir, "lookup,medusa")
    return runs


def check_tokens(runs: dict[int, Ranks], name: str) -> None:
    """Each rank reports its own requests (id % world == rank), with world 1's plain tokens; steps carried
    several tokens."""
    single = runs[1][0]
    for w in WORLDS:
        for r, res in enumerate(runs[w]):
            reported = sorted(int(k.split(".")[2]) for k in res if k.startswith(f"{name}.tokens."))
            assert reported == [i for i in range(len(PROMPTS)) if i % w == r], (name, w, r)
            for rid in reported:
                assert res[f"{name}.tokens.{rid}"].tolist() == single[f"plain.tokens.{rid}"].tolist(), (name, w, rid)
        steps = torch.cat([res[k] for res in runs[w] for k in res if k.startswith(f"{name}.steps.")])
        assert int(steps.max()) >= 4, (name, w)  # runs of accepted drafts
        if not CPU:  # verify steps replayed CUDA graphs (with NCCL collectives in them) on every rank
            assert all(int(res[f"{name}.verify"][0]) > 0 for res in runs[w]), (name, w)


def test_prompt_lookup_keeps_the_greedy_tokens(spec_runs):
    check_tokens(spec_runs, "lookup")


def test_medusa_heads_equal_world_one(spec_runs):
    single = spec_runs[1][0]
    for w in WORLDS:
        for res in spec_runs[w]:
            for key in ("logits", "spec"):
                worst = (res[key] - single[key]).abs().max().item()
                print(f"world {w}: max abs {key} diff vs world 1 = {worst:.2e}")
                torch.testing.assert_close(res[key], single[key], rtol=1e-3, atol=2e-3)
    check_tokens(spec_runs, "medusa")


def test_gptq_logits_equal_world_one(tmp_path):
    from gptq_helpers import gptq_checkpoint
    from helpers import TINY
    from random_weights import random_checkpoint

    cfg = {**TINY, "seq_length": 8}  # NTK active on the longer prompts
    state = random_checkpoint(cfg, seed=21)
    ckpts = []
    for name, bits, sym, act in (("int4", 4, False, True), ("int8", 8, True, False)):
        path, _ = gptq_checkpoint(str(tmp_path / name), cfg, state, bits, 32, sym, act)
        ckpts.append(f"{name}={path}")
    single = spawn("gptq", str(tmp_path / "w1"), 1, ",".join(ckpts))[0]
    assert {k.split(".")[0] for k in single} == {"int4", "int8"}
    for w in WORLDS:
        for res in spawn("gptq", str(tmp_path / f"w{w}"), w, ",".join(ckpts)):
            assert res.keys() == single.keys()
            for dname in GPTQ_DTYPES:
                keys = [k for k in single if f".{dname}." in k]
                worst = max((res[k] - single[k]).abs().max().item() for k in keys)
                scale = max(single[k].abs().max().item() for k in keys)
                print(
                    f"GPTQ {dname}, world {w}: max abs logit diff vs world 1 = {worst:.2e} (logits up to {scale:.1f})"
                )
                assert worst <= (1e-3 if dname == "fp32" else 5e-2 * scale), (dname, w, worst)  # bf16: a few ulps


@pytest.mark.skipif(CPU, reason="the CUDA GPTQ kernels serve CUDA devices only")
def test_gptq_served_kernels_equal_world_one(tmp_path):
    from gptq_helpers import gptq_checkpoint
    from helpers import GPU_TINY
    from random_weights import random_checkpoint

    # 4 heads of 128 and 2 x 1024 mlp columns: every rank's shard at world 2 and 4 keeps K, its first row and N as
    # the CUDA kernels need (multiples of 128, 128 and 8)
    cfg = {**GPU_TINY, "hidden_size": 512, "num_attention_heads": 4, "intermediate_size": 2048}
    state = random_checkpoint(cfg, seed=23)
    ckpts = []
    for name, sym, act in (("sym", True, False), ("asym_act", False, True)):
        path, _ = gptq_checkpoint(str(tmp_path / name), cfg, state, 4, 128, sym, act)
        ckpts.append(f"{name}={path}")
    single = spawn("gptq_served", str(tmp_path / "w1"), 1, ",".join(ckpts))[0]
    runs = [(1, 0, single)] + [
        (w, rank, res)
        for w in WORLDS
        for rank, res in enumerate(spawn("gptq_served", str(tmp_path / f"w{w}"), w, ",".join(ckpts)))
    ]
    for w, rank, res in runs:
        assert res.keys() == single.keys()
        for name in ("sym", "asym_act"):
            for batch in (1, 2):
                pair, tc, linears = res[f"{name}.b{batch}.took"].tolist()
                assert linears == 4 * cfg["num_hidden_layers"]
                if name == "sym":  # no act order: every gate_up and every linear on the served kernels
                    assert pair and tc, (w, rank, batch, pair, tc)
                keys = [k for k in single if k.startswith(f"{name}.b{batch}.step")]
                worst = max((res[k] - single[k]).abs().max().item() for k in keys)
                scale = max(single[k].abs().max().item() for k in keys)
                print(f"served GPTQ {name} batch {batch}, world {w} rank {rank}: max abs logit diff {worst:.2e}")
                assert worst <= 5e-2 * scale, (name, batch, w, rank, worst, scale)
