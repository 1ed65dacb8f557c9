"""One rank of the tensor-parallel feature checks (tests/gpu/test_gpu_tp_features.py), run as its own process with
torchrun variables in the env by tests/tp_spawn.py, on QWEN_TEST_DEVICE with QWEN_TEST_BACKEND (cuda: NCCL, the
Triton backend and CUDA graphs; cpu: gloo and the torch backend). Each rank writes OUT-{rank}.safetensors.

    python tests/tp_features.py spec OUT DEMO RUNS   # RUNS: comma list of plain | lookup | medusa
    python tests/tp_features.py gptq OUT NAME=CKPT,...
    python tests/tp_features.py gptq_served OUT NAME=CKPT,...

spec: the demo model in fp32 (clear argmax margins): each engine run's greedy tokens of the requests this rank
reports, its step lengths and verify steps (graphed, eager), and the Medusa heads' speculative logits of a prefill.
At world size > 1, rank 1's chooser sees noise: only rank 0's broadcast choices may reach any output.
gptq: per checkpoint and dtype, the logits of a prefill and of decode steps on fixed (teacher-forced) tokens, so
that every world computes the same sequences.
gptq_served (cuda): the same in bf16 with the served decode kernels (the CUDA GPTQ GEMVs: gptq_tc at 1-2 rows, gate_up's
activation from its epilogue), for 1 and then 2 sequences, and per batch whether every layer's gate_up gave the
activation and every GPTQ linear took gptq_tc.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from worker.distributed import ParallelContext  # noqa: E402
from worker.models.qwen import FlashQwenForCausalLM  # noqa: E402

SCRIPT = os.path.abspath(__file__)
PROMPTS = [
    "The capital of France is Paris, a city of light and old stone bridges. The capital of France is",
    "The quick brown fox jumps over the lazy dog by the river. The quick brown fox",
    "Water boils at",
    "Tell me a story:",
]
NEW_TOKENS = 32
DRAFTS = 4  # prompt-lookup drafts per step
GPTQ_PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38], [27, 18]]
GPTQ_FORCED = [[7, 200, 31], [54, 1, 99], [250, 12, 64]]  # each sequence's decode tokens
GPTQ_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load(path: str, pctx: ParallelContext, dtype: torch.dtype) -> FlashQwenForCausalLM:
    from worker.layers.attention import make_backend

    backend = make_backend(os.environ.get("QWEN_TEST_BACKEND", "torch"), pctx.device)
    return FlashQwenForCausalLM.from_pretrained(path, pctx, dtype, backend, progress=False)


def spec_logits(model: FlashQwenForCausalLM, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], the heads' speculative logits [T, K, V]) of one prefill of `seqs` without a KV cache."""
    from worker.layers.context import ForwardContext, Seqlen
    from worker.layers.rotary import ntk_alpha

    c, dev = model.config, model.pctx.device
    lens = [len(s) for s in seqs]
    alphas = [ntk_alpha(n, c.seq_length, c.use_dynamic_ntk) for n in lens]
    positions = torch.cat([torch.arange(n, device=dev) for n in lens])
    ctx = ForwardContext.build(
        model.rotary, is_prefill=True, positions=positions, seqlen=Seqlen.for_prefill(lens, None, alphas, dev)
    )
    logits, spec = model.forward_speculative(torch.tensor([t for s in seqs for t in s], device=dev), ctx, None, None)
    assert spec is not None, "no Medusa heads attached"
    return logits, spec


def spec_main(pctx: ParallelContext, demo: str, runs: list[str]) -> dict[str, torch.Tensor]:
    from spec_helpers import engine, greedy_request, run
    from worker.adapters.medusa import load_speculator
    from worker.tokenizer import QwenTokenizer

    path = os.path.join(demo, "model")
    tok = QwenTokenizer.from_dir(path)
    model = load(path, pctx, torch.float32)
    if pctx.rank == 1:  # noise instead of logits: rank 1's own choices would derail the output
        from worker.engine.sampling import BatchSampler

        call = BatchSampler.__call__
        setattr(BatchSampler, "__call__", lambda self, logits, *a: call(self, torch.randn_like(logits), *a))  # noqa: B010
    graphs = pctx.device.type == "cuda"
    results: dict[str, torch.Tensor] = {}
    for name in runs:
        if name == "medusa" and model.medusa.base is None:
            model.attach_medusa(load_speculator(os.path.join(demo, "adapters"), "medusa", model.config))
        e = engine(model, tok, DRAFTS if name == "lookup" else 0, pctx, cuda_graphs=graphs, graph_max_batch=8)
        seen = run(e, [greedy_request(i, tok.encode(p), NEW_TOKENS) for i, p in enumerate(PROMPTS)])
        for rid, steps in seen.steps.items():
            results[f"{name}.tokens.{rid}"] = torch.tensor(seen.tokens(rid))
            results[f"{name}.steps.{rid}"] = torch.tensor([len(s) for s in steps])
        vg = e.runner.verify_graphs if e.runner is not None else None
        if vg is not None:
            results[f"{name}.verify"] = torch.tensor([vg.verify_steps["graphed"], vg.verify_steps["eager"]])
    if model.medusa.base is None:
        model.attach_medusa(load_speculator(os.path.join(demo, "adapters"), "medusa", model.config))
    results["logits"], results["spec"] = spec_logits(model, [tok.encode(p) for p in PROMPTS])
    return results


def teacher_forced(model: FlashQwenForCausalLM, batch: int) -> list[list[torch.Tensor]]:
    """Per step, each sequence's logits (fp32): the prefill of GPTQ_PROMPTS[:batch], then a decode step per
    GPTQ_FORCED token, so that every world computes the same sequences."""
    from paged import Paged
    from worker.layers.rotary import ntk_alpha

    c, ids = model.config, list(range(batch))
    paged, seqs = Paged(model, seed=5), [list(p) for p in GPTQ_PROMPTS[:batch]]
    alphas = [ntk_alpha(len(p), c.seq_length, c.use_dynamic_ntk) for p in seqs]
    steps = [paged.step(ids, seqs, [0] * batch, alphas, True)]
    for forced in zip(*GPTQ_FORCED[:batch]):
        for s, token in zip(seqs, forced):
            s.append(token)
        steps.append(paged.step(ids, seqs, [len(s) - 1 for s in seqs], alphas, False))
    return [[o.float() for o in out] for out in steps]


def gptq_main(pctx: ParallelContext, ckpts: list[str]) -> dict[str, torch.Tensor]:
    results: dict[str, torch.Tensor] = {}
    for item in ckpts:
        name, path = item.split("=", 1)
        for dname, dtype in GPTQ_DTYPES.items():
            for step, out in enumerate(teacher_forced(load(path, pctx, dtype), len(GPTQ_PROMPTS))):
                for k, o in enumerate(out):
                    results[f"{name}.{dname}.step{step}.{k}"] = o
    return results


def gptq_served_main(pctx: ParallelContext, ckpts: list[str]) -> dict[str, torch.Tensor]:
    from worker.layers.attention import make_backend
    from worker.layers.decode_kernels import SERVED, parse_decode_kernels, where_applies
    from worker.layers.quantized import _GPTQ

    kernels = where_applies(parse_decode_kernels(",".join(SERVED)), pctx.device)
    backend = make_backend(os.environ.get("QWEN_TEST_BACKEND", "torch"), pctx.device)
    results: dict[str, torch.Tensor] = {}
    for item in ckpts:
        name, path = item.split("=", 1)
        model = FlashQwenForCausalLM.from_pretrained(
            path, pctx, torch.bfloat16, backend, progress=False, decode_kernels=kernels
        )
        for batch in (1, 2):
            for step, out in enumerate(teacher_forced(model, batch)):
                for k, o in enumerate(out):
                    results[f"{name}.b{batch}.step{step}.{k}"] = o
            x = torch.zeros(batch, model.config.hidden_size, device=pctx.device, dtype=torch.bfloat16)
            layers = model.transformer.layers()
            pair = [layer.mlp.gate_up.forward_silu_mul(x) is not None for layer in layers]  # type: ignore[operator]
            tc = [m._takes_tc(batch) for m in model.modules() if isinstance(m, _GPTQ)]
            results[f"{name}.b{batch}.took"] = torch.tensor([all(pair), all(tc), len(tc)], dtype=torch.int32)
        del model
    return results


def main() -> None:
    from worker.distributed import init_from_env, shutdown

    torch.set_num_threads(1)
    pctx = init_from_env(os.environ, os.environ.get("QWEN_TEST_DEVICE", "cpu"), timeout_s=120)
    kind, out, arg = sys.argv[1:4]
    if kind == "spec":
        results = spec_main(pctx, arg, sys.argv[4].split(","))
    elif kind == "gptq_served":
        results = gptq_served_main(pctx, arg.split(","))
    else:
        results = gptq_main(pctx, arg.split(","))
    save_file({k: v.detach().cpu().contiguous() for k, v in results.items()}, f"{out}-{pctx.rank}.safetensors")
    shutdown(pctx)


if __name__ == "__main__":
    main()
