"""PDL (the served default, worker/layers/decode_kernels.py) on quantized models on the GPU: FP8 weights (the dense
GEMV with row scales) and GPTQ Int4 with act order (the GPTQ GEMV) decode bit for bit as without it, bf16, batch 4
and batch 1 (PDL only moves the launch; no arithmetic changes)."""

from __future__ import annotations

import pytest
import torch

from helpers import GPU_TINY, write_checkpoint
from paged import Paged
from random_weights import random_checkpoint
from worker.distributed import ParallelContext

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CFG = GPU_TINY


def _decode(path: str, quantize: str, pdl: bool) -> list[torch.Tensor]:
    """Every step's last-token logits: a prefill of 4 prompts, 4 greedy decode steps of batch 4, 2 of batch 1."""
    from worker.layers.attention_triton import TritonAttention
    from worker.layers.decode_kernels import DecodeKernels, where_applies
    from worker.models.qwen import FlashQwenForCausalLM

    pctx = ParallelContext(0, 1, torch.device("cuda", 0))
    kernels = where_applies(DecodeKernels(pdl=pdl), pctx.device)
    model = FlashQwenForCausalLM.from_pretrained(
        path, pctx, torch.bfloat16, TritonAttention(), progress=False, quantize=quantize, decode_kernels=kernels
    )
    assert kernels.pdl == pdl  # sm_90+: PDL really on in the second run
    from worker.layers.quantized import _GPTQ

    assert all(m.gemv is not None for m in model.modules() if isinstance(m, _GPTQ))  # decode through the GEMV
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 9, 20, 33)]
    p = Paged(model, num_blocks=64)
    out = p.step([0, 1, 2, 3], seqs, [0] * 4, [1.0] * 4, True)
    logits = [torch.stack([o[-1].float().cpu() for o in out])]
    for rows in ([0, 1, 2, 3],) * 4 + ([0],) * 2:
        for r, o in zip(rows, out):
            seqs[r].append(int(o[-1].argmax()))
        out = p.step(rows, [seqs[r] for r in rows], [len(seqs[r]) - 1 for r in rows], [1.0] * len(rows), False)
        logits.append(torch.stack([o[-1].float().cpu() for o in out]))
    return logits


@pytest.mark.parametrize("kind", ["fp8", "int4_act"])
def test_pdl_decodes_quantized_models_bit_for_bit(tmp_path, kind):
    from gptq_helpers import gptq_checkpoint

    state = random_checkpoint(CFG, seed=5)
    if kind == "fp8":
        path, quantize = write_checkpoint(str(tmp_path / "f"), CFG, state), "fp8"
    else:
        path, _ = gptq_checkpoint(str(tmp_path / "q"), CFG, state, 4, 128, False, True)
        quantize = "auto"
    plain, pdl = _decode(path, quantize, False), _decode(path, quantize, True)
    assert len(plain) == 7 and all(torch.equal(a, b) for a, b in zip(plain, pdl))
