"""Speculative decoding on the GPU: the Triton backend, CUDA graphs and the decode look-ahead on (auto), fp32
weights (the demo model) so that greedy output must be exact. Verify steps replay the verify graphs
(engine/graphed_verify.py, tests/gpu/test_gpu_spec_graphs.py) beside graphed pure-decode steps; the
look-ahead stays off for batches with drafts. The claims:
greedy tokens with prompt-lookup drafts and with the demo's Medusa heads equal the run without drafts (which
replays the decode graphs), with drafts accepted."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import GPU_TRITON_MARKS
from spec_helpers import Spy, engine, greedy_request, run

pytestmark = GPU_TRITON_MARKS

PROMPTS = [
    "The capital of France is Paris, a city of light and old stone bridges. The capital of France is",
    "The quick brown fox jumps over the lazy dog by the river. The quick brown fox",
    "Water boils at",
    "Tell me a story:",
]


@pytest.mark.parametrize("kv", ["fp32", "fp8"])
def test_drafts_keep_the_greedy_output_with_graphs(demo_dir, kv, monkeypatch):
    from worker.adapters.medusa import load_speculator
    from worker.distributed import ParallelContext
    from worker.layers.attention import make_backend
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.tokenizer import QwenTokenizer

    dev = torch.device("cuda")
    pctx = ParallelContext(device=dev)
    path = os.path.join(demo_dir, "model")
    tok = QwenTokenizer.from_dir(path)

    def load() -> FlashQwenForCausalLM:
        return FlashQwenForCausalLM.from_pretrained(
            path, pctx, torch.float32, make_backend("triton", dev), progress=False
        )

    cfg = {"cuda_graphs": True, "kv_cache_dtype": torch.float8_e4m3fn if kv == "fp8" else None}

    def requests() -> list:
        return [greedy_request(i, tok.encode(p), 40) for i, p in enumerate(PROMPTS)]

    plain = load()
    off_engine = engine(plain, tok, 0, pctx, **cfg)
    assert off_engine.runner is not None and off_engine.runner.graphs is not None
    replays = []
    graphed = off_engine.runner.graphs.run
    off_engine.runner.graphs.run = lambda b, s: replays.append(len(b.requests)) or graphed(b, s)
    off = run(off_engine, requests())
    assert replays  # the run without drafts decodes through the graphs
    spy = Spy.on(monkeypatch)
    on = run(engine(plain, tok, 4, pctx, **cfg), requests())
    heads = load()
    heads.attach_medusa(load_speculator(os.path.join(demo_dir, "adapters"), "medusa", heads.config))
    medusa = run(engine(heads, tok, 0, pctx, **cfg), requests())
    for rid in range(len(PROMPTS)):
        assert on.tokens(rid) == off.tokens(rid), ("lookup", rid)
        assert medusa.tokens(rid) == off.tokens(rid), ("medusa", rid)
    assert spy.accepted >= 20 and max(len(s) for s in medusa.steps[2]) == 4
