"""GPTQ under tensor parallelism on CPU (gloo, real processes): every rank's logits equal the float64
reference on the dequantized weights, for Int4 with act order and Int8 without, at TP=2, with a
mixed-adapter batch. mlp.c_proj has 96 input rows in groups of 32: each rank's 48 rows are 1.5 groups
(the split other engines refuse), served with full scales/zeros per rank looked up through g_idx.

Run as a script, this file is one rank: RANK/WORLD_SIZE/MASTER_* in the env, argv: CKPT ADAPTERS OUT.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from helpers import TINY  # noqa: E402

CFG = {**TINY, "seq_length": 16}
PROMPTS = [[3, 14, 15, 92, 65], [35, 89, 79, 32, 38, 46, 26, 43, 38], [27, 18]]
WHICH = [0, 1, 2]  # base, adapter a4, adapter a16
STEPS = 2


def rank_main() -> None:
    from lora_helpers import attach_manager, load
    from paged import Paged
    from worker.distributed import init_from_env, shutdown
    from worker.models.qwen import FlashQwenForCausalLM

    ckpt, adapters, out = sys.argv[1:4]
    torch.set_num_threads(1)
    pctx = init_from_env(os.environ, os.environ.get("QWEN_TEST_DEVICE", "cpu"), timeout_s=60)
    model = FlashQwenForCausalLM.from_pretrained(ckpt, pctx, torch.float32, progress=False)
    mgr, _ = attach_manager(model, adapters, max_rank=16, num_slots=2)
    load(mgr, 1, "a4")
    load(mgr, 2, "a16")
    slots = [mgr.entries[i].slot if i else 0 for i in WHICH]
    paged = Paged(model)
    n = len(PROMPTS)
    seqs = [list(p) for p in PROMPTS]
    results = {}
    logits = paged.step(list(range(n)), seqs, [0] * n, [1.0] * n, True, slots)
    for step in range(STEPS + 1):
        for k, o in enumerate(logits):
            results[f"step{step}_{k}"] = o[-1]
        if step == STEPS:
            break
        for s, o in zip(seqs, logits):
            s.append(int(o[-1].argmax()))
        logits = paged.step(list(range(n)), seqs, [len(s) - 1 for s in seqs], [1.0] * n, False, slots)
    for k, s in enumerate(seqs):
        results[f"seq{k}"] = torch.tensor(s)
    save_file({k: v.contiguous() for k, v in results.items()}, f"{out}-{pctx.rank}.safetensors")
    shutdown(pctx)


def test_tp2_equals_reference_on_dequantized_weights(tmp_path):
    check_tp2(tmp_path)


def check_tp2(tmp_path, tol: float = 1e-4, **env: str) -> None:
    """Also run by tests/gpu/test_gpu_quant.py over NCCL (env QWEN_TEST_DEVICE=cuda: the Triton kernels)."""
    import pytest

    from gptq_helpers import dequantized_state, gptq_checkpoint
    from lora_helpers import write_adapter
    from random_weights import random_checkpoint
    from reference import merge_lora, ref_forward
    from tp_spawn import run_ranks

    state = random_checkpoint(CFG, seed=13)
    root = str(tmp_path / "adapters")
    a4 = write_adapter(root, "a4", CFG, 4, 8, seed=1)
    a16 = write_adapter(root, "a16", CFG, 16, 16, seed=2, targets=("c_attn", "c_proj", "w1", "w2"))
    for bits, sym, act in ((4, False, True), (8, True, False)):
        path, q = gptq_checkpoint(str(tmp_path / f"q{bits}"), CFG, state, bits, 32, sym, act)
        deq = dequantized_state(q, bits)
        merged = [deq, merge_lora(deq, *a4), merge_lora(deq, *a16)]
        out = str(tmp_path / f"out{bits}")
        ranks = run_ranks([os.path.abspath(__file__), path, root, out], out, 2, **env)
        worst = 0.0
        for res in ranks:
            assert torch.equal(res["seq0"], ranks[0]["seq0"])
            for k, (p, a) in enumerate(zip(PROMPTS, WHICH)):
                seq = res[f"seq{k}"].tolist()
                ref = ref_forward(merged[a], CFG, seq, prompt_len=len(p))
                for step in range(STEPS + 1):
                    row = ref[len(p) - 1 + step]
                    worst = max(worst, (res[f"step{step}_{k}"].double() - row).abs().max().item())
        if worst > tol:
            pytest.fail(f"Int{bits}: max abs logit diff {worst}")


if __name__ == "__main__":
    rank_main()
