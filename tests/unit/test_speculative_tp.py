"""Speculative decoding under tensor parallelism (TP=2 over gloo, two real processes), fp32 on the CPU.

Each rank runs the same requests through an engine with prompt-lookup drafts and through one with the demo's
Medusa heads (sharded column-parallel); every rank must accept the same tokens (rank 0's broadcast ids), or
the ranks' next forwards would differ in shape and their collectives hang or fail. Rank 1's chooser is fed
noise instead of logits, so any of its own choices that leaked into a step would show. The claims: both ranks
finish, the requests each rank reports (id % 2 == rank) together carry exactly the tokens of a single-process
engine without drafts, and steps did carry several tokens.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/unit/test_speculative_tp.py DEMO OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]

import torch  # noqa: E402

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
    with open(f"{out}-{pctx.rank}.json", "w") as f:
        json.dump(result, f)
    shutdown(pctx)


def test_ranks_accept_the_same_tokens(demo_dir, tmp_path):
    from worker.launcher import free_port

    out = str(tmp_path / "spec")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, os.path.abspath(__file__), demo_dir, out]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        output, _ = p.communicate(timeout=600)
        assert p.returncode == 0, output.decode()[-3000:]
    ranks = []
    for r in range(2):
        with open(f"{out}-{r}.json") as f:
            ranks.append(json.load(f))
    path = os.path.join(demo_dir, "model")
    tok = QwenTokenizer.from_dir(path)
    single = generate(FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False), tok, 0)
    for kind in ("lookup", "medusa"):
        for r in range(2):
            reported = {int(k): v for k, v in ranks[r][kind].items()}
            assert sorted(reported) == [i for i in range(8) if i % 2 == r]  # each rank reports its own requests
            for rid, steps in reported.items():
                assert [t for s in steps for t in s] == [t for s in single[rid] for t in s], (kind, rid)
        multi = [len(s) for r in range(2) for steps in ranks[r][kind].values() for s in steps]
        assert max(multi) >= 4, kind  # runs of accepted drafts happened


if __name__ == "__main__":
    main()
