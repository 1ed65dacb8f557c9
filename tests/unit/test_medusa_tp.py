"""Medusa heads under tensor parallelism (gloo, 2 real processes): a v1 base speculator of two blocks and a
per-request v2 adapter over the pool, each rank's speculative logits against the float64 formula.

This file is also the rank script: `python test_medusa_tp.py CKPT ROOT OUT` with torchrun variables set.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

from helpers import TINY, within, write_checkpoint  # noqa: E402
from medusa_helpers import forward_spec, medusa_tensors, ref_hidden, ref_medusa, write_medusa  # noqa: E402
from worker.config import QwenConfig  # noqa: E402

H, V, K = QwenConfig.from_dict(TINY).hidden_size, QwenConfig.from_dict(TINY).vocab_size, 3
SEQS = [[5, 17, 200, 3, 9], [7, 250, 1]]


def rank_main(ckpt: str, root: str, out: str) -> None:
    from lora_helpers import attach_manager, load
    from worker.adapters.medusa import load_speculator
    from worker.distributed import init_from_env, shutdown
    from worker.models.qwen import FlashQwenForCausalLM

    torch.set_num_threads(1)
    pctx = init_from_env(os.environ, "cpu", timeout_s=60)
    model = FlashQwenForCausalLM.from_pretrained(ckpt, pctx, torch.float32, progress=False)
    model.attach_medusa(load_speculator(root, "base", model.config))
    mgr, _ = attach_manager(model, root)
    load(mgr, 1, "m2")
    logits, spec = forward_spec(model, SEQS, [0, mgr.entries[1].slot])
    assert spec is not None
    heads = model.medusa.base
    assert heads is not None and heads.weight.shape == (2, K, H // pctx.world_size, H)  # this rank's rows
    save_file({"logits": logits, "spec": spec.contiguous()}, f"{out}-{pctx.rank}.safetensors")
    shutdown(pctx)


def test_tp2_speculative_logits_match_float64(tmp_path):
    from random_weights import random_checkpoint
    from tp_spawn import run_ranks

    state = random_checkpoint(TINY, seed=3)
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), TINY, state)
    root = str(tmp_path / "root")
    base, m2 = medusa_tensors(H, V, K, 2, True, seed=1), medusa_tensors(H, V, K, 1, False, seed=2)
    write_medusa(os.path.join(root, "base"), base, K, 2)
    write_medusa(os.path.join(root, "m2"), m2, K, 1)
    out = str(tmp_path / "out")
    ranks = run_ranks([os.path.abspath(__file__), ckpt, root, out], out, 2)
    lm_head = state["lm_head.weight"]
    ref = [
        ref_medusa(ref_hidden(state, TINY, SEQS[0]), base, lm_head, K, 2, True),
        ref_medusa(ref_hidden(state, TINY, SEQS[1]), m2, lm_head, K, 1, False),
    ]
    for got in ranks:
        within(got["logits"], torch.cat([x[0] for x in ref]), 2e-4)
        within(got["spec"], torch.cat([x[1] for x in ref]), 2e-4)


if __name__ == "__main__":
    rank_main(*sys.argv[1:4])
