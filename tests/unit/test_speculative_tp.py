"""Speculative decoding under tensor parallelism (TP=2 over gloo, two real processes), fp32 on the CPU.

Each rank runs the same requests through an engine with prompt-lookup drafts and through one with the demo's
Medusa heads (sharded column-parallel); every rank must accept the same tokens (rank 0's broadcast ids), or
the ranks' next forwards would differ in shape and their collectives hang or fail. Rank 1's chooser is fed
noise instead of logits, so any of its own choices that leaked into a step would show. The claims: both ranks
finish, the requests each rank reports (id % 2 == rank) together carry exactly the tokens of a single-process
engine without drafts, and steps did carry several tokens.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/unit/test_speculative_tp.py DEMO OUT
    (writes OUT-r.safetensors; tests/tp_spawn.run_ranks starts both ranks)
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from spec_helpers import engine, greedy_request, run  # noqa: E402
from worker.models.qwen import FlashQwenForCausalLM  # noqa: E402
from worker.tokenizer import QwenTokenizer  # noqa: E402

PROMPTS = [
    "The capital of France is Paris, a city of light and old stone bridges. The capital of France is",
    "The quick brown fox jumps over the lazy dog by the river. The quick brown fox",
    "Water boils at",
    "Tell me a story:",
]
SAMPLE = dict(do_sample=True, temperature=0.8, top_k=10)


def requests(tok: QwenTokenizer) -> list:
    """Greedy requests 0..3 and seeded sampling requests 4..7 on the same prompts."""
    greedy = [greedy_request(i, tok.encode(p), 24) for i, p in enumerate(PROMPTS)]
    return greedy + [greedy_request(4 + i, tok.encode(p), 24, seed=50 + i, **SAMPLE) for i, p in enumerate(PROMPTS)]


def generate(model: FlashQwenForCausalLM, tok: QwenTokenizer, n: int, pctx=None) -> dict[int, list[list[int]]]:
    """Each reported request's tokens, step by step."""
    return run(engine(model, tok, n, pctx), requests(tok)).steps


def pack(result: dict[str, dict[int, list[list[int]]]]) -> dict[str, torch.Tensor]:
    """Each reported request's steps as two tensors: `KIND.ID.tokens` (all, in order) and `KIND.ID.steps`
    (how many each step carried)."""
    out = {}
    for kind, reported in result.items():
        for rid, steps in reported.items():
            out[f"{kind}.{rid}.tokens"] = torch.tensor([t for s in steps for t in s], dtype=torch.int64)
            out[f"{kind}.{rid}.steps"] = torch.tensor([len(s) for s in steps], dtype=torch.int64)
    return out


def unpack(tensors: dict[str, torch.Tensor], kind: str) -> dict[int, tuple[list[int], list[int]]]:
    """Request id -> (its tokens, tokens per step), as `pack` wrote them for `kind`."""
    ids = {int(name.split(".")[1]) for name in tensors if name.startswith(kind + ".")}
    return {rid: (tensors[f"{kind}.{rid}.tokens"].tolist(), tensors[f"{kind}.{rid}.steps"].tolist()) for rid in ids}


def main() -> None:
    from worker.adapters.medusa import load_speculator
    from worker.distributed import init_from_env, shutdown

    demo, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pctx = init_from_env(os.environ, "cpu", timeout_s=60)
    path = os.path.join(demo, "model")
    tok = QwenTokenizer.from_dir(path)
    model = FlashQwenForCausalLM.from_pretrained(path, pctx, torch.float32, progress=False)
    if pctx.rank == 1:  # rank 1's chooser sees noise: only rank 0's broadcast choices may reach any output
        from worker.engine.sampling import BatchSampler

        call = BatchSampler.__call__
        setattr(BatchSampler, "__call__", lambda self, logits, *a: call(self, torch.randn_like(logits), *a))  # noqa: B010
    result = {"lookup": generate(model, tok, 4, pctx)}
    model.attach_medusa(load_speculator(os.path.join(demo, "adapters"), "medusa", model.config))
    result["medusa"] = generate(model, tok, 0, pctx)
    save_file(pack(result), f"{out}-{pctx.rank}.safetensors")
    shutdown(pctx)


def test_ranks_accept_the_same_tokens(demo_dir, tmp_path):
    from tp_spawn import run_ranks

    out = str(tmp_path / "spec")
    ranks = run_ranks([os.path.abspath(__file__), demo_dir, out], out, 2)
    path = os.path.join(demo_dir, "model")
    tok = QwenTokenizer.from_dir(path)
    single = generate(FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False), tok, 0)
    for kind in ("lookup", "medusa"):
        reported = [unpack(ranks[r], kind) for r in range(2)]
        for r in range(2):
            assert sorted(reported[r]) == [i for i in range(8) if i % 2 == r]  # each rank reports its own requests
            for rid, (tokens, _) in reported[r].items():
                assert tokens == [t for s in single[rid] for t in s], (kind, rid)
        multi = [n for r in range(2) for _, steps in reported[r].values() for n in steps]
        assert max(multi) >= 4, kind  # runs of accepted drafts happened


if __name__ == "__main__":
    main()
