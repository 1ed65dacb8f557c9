"""Shared test helpers: repo paths, a tiny Qwen v1 config, writing checkpoints to disk, tolerance checks
and seeded random tensors."""

from __future__ import annotations

import json
import os
import random
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

# GPU tests of Triton code: on a CUDA machine only, and not in a CPU run under TRITON_INTERPRET
GPU_TRITON_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter set: CPU run"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A router sized for the demo model (seq_length 256): prompts up to 64 tokens, 256 tokens in all.
ROUTER_LIMITS = dict(max_input_length=64, max_total_tokens=256, max_batch_prefill_tokens=256)

TINY = dict(
    model_type="qwen",
    hidden_size=64,
    num_attention_heads=4,
    kv_channels=16,
    num_hidden_layers=2,
    intermediate_size=192,
    vocab_size=256,
    seq_length=64,
    rotary_emb_base=10000,
    rotary_pct=1.0,
    layer_norm_epsilon=1e-6,
    use_dynamic_ntk=True,
    use_logn_attn=True,
    no_bias=True,
)

# the GPU tests' small model: 2 heads of 128 (the paged kernels' head size), c_attn and w2|w1 GEMV-sized
GPU_TINY = dict(
    model_type="qwen",
    hidden_size=256,
    num_attention_heads=2,
    kv_channels=128,
    num_hidden_layers=2,
    intermediate_size=1024,
    vocab_size=512,
    seq_length=32,
    rotary_emb_base=10000,
)


def write_checkpoint(path: str, cfg: dict, state: dict[str, torch.Tensor], n_files: int = 2) -> str:
    """Write `state` as sharded safetensors + index + config.json into `path`."""
    os.makedirs(path, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for i in range(n_files):
        group = names[i::n_files]
        fn = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in group}, os.path.join(path, fn))
        weight_map.update(dict.fromkeys(group, fn))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return path


def within(out: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Assert `out` is finite, shaped like `ref` and within tol · (1 + |ref|) of it everywhere; returns the
    max abs diff."""
    assert out.shape == ref.shape and torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs()
    worst = (err / (tol * (1 + ref.float().abs()))).max().item()
    assert worst <= 1.0, f"max abs diff {err.max().item()} (worst at {worst:.2f} x tolerance)"
    return err.max().item()


def ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in units of the last place of b (elementwise; ulp(b) = 2^floor(log2|b|) * eps)."""
    info = torch.finfo(b.dtype)
    _, exp = torch.frexp(b.double().abs().clamp_min(info.tiny))
    ulp = torch.ldexp(torch.full_like(b, info.eps, dtype=torch.float64), exp - 1)
    return ((a.double() - b.double()).abs() / ulp).max().item()


def randn(
    *shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Seeded N(0, scale²) in `dtype` (drawn in fp32 on `device`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


# JSON schemas the structured-output tests constrain to (bounded, so greedy outputs complete quickly).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "ok": {"type": "boolean"}},
    "required": ["x", "ok"],
    "additionalProperties": False,
}


def chunk_request(rid: int, ids: list[int], max_new: int, chunk: int | None = None, **kw: Any) -> Any:
    """A greedy (or, with seeded=True, seeded sampling) pb.Request that ignores eos, cut to `chunk` prompt
    tokens when given (Request.chunk_len); other keywords are Request fields."""
    from worker.pb import generate_pb2 as pb

    params = {"temperature": 1.0, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0}
    if kw.pop("seeded", False):
        params.update(temperature=0.9, do_sample=True, seed=1234)
    req = pb.Request(
        id=rid,
        inputs="",
        tokenized_inputs=pb.TokenizedInputs(ids=ids),
        parameters=pb.NextTokenChooserParameters(**params),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
        **kw,
    )
    if chunk is not None:
        req.chunk_len = chunk
    return req


def decode_requests(lengths: list[int], seq_length: int = 32, block: int = 16, blocks: int = 199, seed: int = 0) -> Any:
    """A batch for the engine's Runner and GraphedDecode: a request a length n, n random prompt ids in shuffled blocks
    1 .. blocks - 1 with a slot for one more token, its dynamic-NTK alpha at `seq_length`, nothing cached yet."""
    from types import SimpleNamespace

    from worker.layers.rotary import ntk_alpha

    free = list(range(1, blocks))
    random.Random(seed).shuffle(free)
    reqs = []
    for n in lengths:
        owned = [free.pop() for _ in range(-(-(n + 1) // block))]
        reqs.append(
            SimpleNamespace(
                ids=torch.randint(0, 512, (n,)).tolist(),
                blocks=owned,
                slots=[owned[p // block] * block + p % block for p in range(n + 1)],
                ntk_alpha=ntk_alpha(n, seq_length, True),
                n_cached=0,
                prefill_logprobs=False,
            )
        )
    return SimpleNamespace(requests=reqs)


def counted_calls(monkeypatch: Any, module: Any, name: str) -> list[int]:
    """Replace module.name by a wrapper that records each call's first argument's rows, then calls the original; the
    list it fills."""
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(a[0].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


def replayed(fn: Any) -> Any:
    """fn's output from a CUDA graph of it (the engine's cuda_graphs.capture; fn already compiled: no warm-up run),
    replayed once and synchronized."""
    from worker.engine.cuda_graphs import capture

    graph, out = capture(fn, warmup=0)
    graph.replay()
    torch.cuda.synchronize()
    return out
