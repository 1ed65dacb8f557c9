"""The P1 decode candidates (worker/layers/decode_kernels.py) on the GPU, bf16, on the tiny model of
test_gpu_model.py with its c_attn and w2|w1 shapes given a GEMV plan (as the 7B shapes have): each candidate's
prefill + decode logits (batch 4 and batch 1) against the float64 reference; PDL (GEMVs, fused kernels, paged
decode attention), rope_store and serve's default set but attn_cuda (no arithmetic changed) bit for bit equal to the
baseline; the default set with attn_cuda (at batch 1: the CUDA decode attention with RoPE + store inside) within the
reference's bound.
The 7B shape, CUDA graphs and timings: scripts/gpu_check_p1.py."""

from __future__ import annotations

import pytest
import torch

from helpers import GPU_TINY, write_checkpoint
from paged import Paged
from random_weights import random_checkpoint
from reference import ref_forward
from worker.distributed import ParallelContext
from worker.layers.decode_kernels import SERVED
from worker.layers.rotary import ntk_alpha

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = GPU_TINY
CANDIDATES = {
    "baseline": dict(),
    "served": dict.fromkeys(SERVED, True),  # serve's default (--decode-kernels)
    # without the CUDA decode attention (attn_cuda), which sums in another order than the Triton kernels
    "served_triton_attention": dict.fromkeys([n for n in SERVED if n != "attn_cuda"], True),
    "pdl": dict(pdl=True),
    "act_gemv": dict(act_gemv=True),
    "rope_store": dict(rope_store=True),
    "all": dict(pdl=True, act_gemv=True, rope_store=True),
}


Run = tuple[list[list[int]], list[list[int]], list[torch.Tensor], list[int], torch.Tensor]


def _run(path: str, opts: dict) -> Run:
    """Prefill 4 prompts, 6 greedy decode steps of batch 4 (the GEMV paths), then 2 of the first sequence alone
    (batch 1: the act GEMV): (prompts, sequences after the batch-4 steps, each of those steps' last-token logits
    [4, vocab], the first sequence after its batch-1 steps, the last one's logits [vocab])."""
    from worker.layers.attention_triton import TritonAttention
    from worker.layers.decode_kernels import DecodeKernels, apply_decode_kernels
    from worker.models.qwen import FlashQwenForCausalLM

    pctx = ParallelContext(0, 1, torch.device("cuda", 0))
    model = FlashQwenForCausalLM.from_pretrained(path, pctx, torch.bfloat16, TritonAttention(), progress=False)
    apply_decode_kernels(model.transformer, DecodeKernels(**opts))
    g = torch.Generator().manual_seed(0)
    lengths = [1, 17, 40, 70]  # logn active past 32
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]
    alphas = [ntk_alpha(n, 32, True) for n in lengths]
    p = Paged(model, num_blocks=128)
    outs = [p.step([0, 1, 2, 3], prompts, [0] * 4, alphas, True)]
    seqs = [list(s) for s in prompts]
    for _ in range(6):
        for s, o in zip(seqs, outs[-1]):
            s.append(int(o[-1].argmax()))
        outs.append(p.step([0, 1, 2, 3], seqs, [len(s) - 1 for s in seqs], alphas, False))
    alone, last = seqs[0] + [int(outs[-1][0][-1].argmax())], None
    for _ in range(2):
        last = p.step([0], [alone], [len(alone) - 1], alphas[:1], False)[0][-1].float().cpu()
        alone.append(int(last.argmax()))
    assert last is not None
    return prompts, seqs, [torch.stack([o[-1].float().cpu() for o in step]) for step in outs], alone[:-1], last


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from worker.kernels import gemv_dense

    path = write_checkpoint(str(tmp_path_factory.mktemp("ckpt")), CFG, random_checkpoint(CFG, seed=3))
    plan = gemv_dense.DENSE_GEMV_PLAN
    saved = dict(plan)
    plan[(256, 768)] = ((8, gemv_dense.DENSE_PF0),)  # c_attn
    plan[(256, 1024)] = ((1, gemv_dense.DENSE_PF0), (8, gemv_dense.DENSE_N64))  # w2|w1
    try:
        yield {name: _run(path, opts) for name, opts in CANDIDATES.items()}
    finally:
        plan.clear()
        plan.update(saved)


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_candidate_matches_the_float64_reference(runs, name):
    """The prefill's and the last decode step's last-token logits within bf16's bound (0.15, as test_gpu_model)
    of the float64 reference."""
    state = random_checkpoint(CFG, seed=3)
    prompts, seqs, logits, alone, last = runs[name]
    worst = 0.0
    for i, (x, s) in enumerate(zip(prompts, seqs)):
        worst = max(worst, (logits[0][i].double() - ref_forward(state, CFG, x)[-1]).abs().max().item())
        ref = ref_forward(state, CFG, s, prompt_len=len(x))[-1]  # the last step fed s[-1]
        worst = max(worst, (logits[-1][i].double() - ref).abs().max().item())
    ref = ref_forward(state, CFG, alone, prompt_len=len(prompts[0]))[-1]  # the batch-1 step fed alone[-1]
    worst = max(worst, (last.double() - ref).abs().max().item())
    print(f"{name}: max abs logit diff vs float64 {worst:.2e}")
    assert worst <= 0.15


@pytest.mark.parametrize("name", ["pdl", "rope_store", "served_triton_attention"])
def test_exact_candidates_equal_the_baseline_bit_for_bit(runs, name):
    assert runs[name][1] == runs["baseline"][1] and runs[name][3] == runs["baseline"][3]
    assert all(torch.equal(a, b) for a, b in zip(runs[name][2], runs["baseline"][2]))
    assert torch.equal(runs[name][4], runs["baseline"][4])
