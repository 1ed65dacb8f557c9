"""One rank of a tensor-parallel check, run as its own process with torchrun variables in the env.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/tp_worker.py CKPT OUT

Runs a mixed prefill (NTK/logn active), 6 greedy decode steps and a suffix prefill through the paged
cache, and writes every logit it computed to OUT-{rank}.safetensors.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paged import Paged  # noqa: E402
from tp_spawn import run_ranks  # noqa: E402
from worker.distributed import init_from_env, shutdown  # noqa: E402
from worker.layers.rotary import ntk_alpha  # noqa: E402
from worker.models.qwen import FlashQwenForCausalLM  # noqa: E402


def run_world(ckpt: str, out: str, world: int, adapter_root: str, **env_extra: str) -> list[dict[str, torch.Tensor]]:
    return run_ranks([os.path.abspath(__file__), ckpt, out, adapter_root], out, world, **env_extra)


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]  # optional argv[3]: adapter root with a4 and a16
    torch.set_num_threads(1)
    pctx = init_from_env(os.environ, os.environ.get("QWEN_TEST_DEVICE", "cpu"), timeout_s=60)
    from worker.layers.attention import make_backend
    from worker.layers.decode_kernels import DecodeKernels

    backend = make_backend(os.environ.get("QWEN_TEST_BACKEND", "torch"), pctx.device)
    lora_decode = os.environ.get("QWEN_TEST_LORA_DECODE", "")
    gemm_kernels = {  # QWEN_TEST_LORA_DECODE gemm*: the "gemm" decode mode with these of the term's decode kernels
        "gemm": DecodeKernels(),
        "gemm_act": DecodeKernels(lora_act_shrink=True),  # mlp.c_proj's h from gate|up
        "gemm_term": DecodeKernels(lora_act_shrink=True, lora_term_first=True),  # its term as the GEMM's C
        "gemm_norm": DecodeKernels(lora_act_shrink=True, lora_term_first=True, lora_norm_shrink=True),  # and c_attn's
        "gemm_lanes": DecodeKernels(  # and mlp.c_proj's h into its K lanes
            lora_act_shrink=True, lora_term_first=True, lora_norm_shrink=True, lora_k_lanes=True
        ),
    }
    # the gate|up expand + activation and ln_1's shrink need the fused kernels
    fused = True if lora_decode in gemm_kernels and lora_decode != "gemm" else None
    model = FlashQwenForCausalLM.from_pretrained(ckpt, pctx, torch.float32, backend, progress=False, fused=fused)
    S = model.config.seq_length
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (1, 7, 21)]
    alphas = [ntk_alpha(len(p), S, True) for p in prompts]
    paged = Paged(model, seed=3)
    results: dict[str, Any] = {}
    out_logits = paged.step([0, 1, 2], prompts, [0, 0, 0], alphas, prefill=True)
    for k, o in enumerate(out_logits):
        results[f"prefill{k}"] = o
    seqs = [list(p) for p in prompts]
    for step in range(6):
        for s, o in zip(seqs, out_logits):
            s.append(int(o[-1].argmax()))
        out_logits = paged.step([0, 1, 2], seqs, [len(s) - 1 for s in seqs], alphas, prefill=False)
        for k, o in enumerate(out_logits):
            results[f"decode{step}_{k}"] = o
    suffix = torch.randint(0, 256, (15,), generator=g).tolist()
    paged.step([3], [suffix[:6]], [0], [ntk_alpha(15, S, True)], prefill=True)
    results["suffix"] = paged.step([3], [suffix], [6], [ntk_alpha(15, S, True)], prefill=True)[0]
    # this rank's weight slices, to check that they reassemble to the checkpoint's tensors
    layer = model.transformer.layers()[0]
    results["c_attn_w"] = layer.attn.c_attn.weight
    results["c_attn_b"] = layer.attn.c_attn.bias
    results["gate_up"] = layer.mlp.gate_up.weight
    results["attn_c_proj"] = layer.attn.c_proj.weight
    results["mlp_c_proj"] = layer.mlp.c_proj.weight
    results["wte"] = model.transformer.wte.weight
    if len(sys.argv) > 3:  # adapters: a mixed batch (base + two adapters) under TP
        from lora_helpers import attach_manager, load

        if lora_decode == "gemm_lanes":  # mlp.c_proj's lanes at this tiny width
            from worker.adapters import slots as slots_mod

            slots_mod.LANES_MAX_SHARE = 4.0
        pool_rank = int(os.environ.get("QWEN_TEST_POOL_RANK", "0")) or None  # pools that grow as a16 loads
        mgr, _ = attach_manager(model, sys.argv[3], max_rank=16, num_slots=2, pool_rank=pool_rank)
        if os.environ.get("QWEN_TEST_LORA_BACKEND") == "triton":  # the Triton kernels (interpreted on a CPU)
            from worker.kernels import lora as kernels

            for t in model.lora_targets():
                getattr(t.owner, t.attr).lora.kernels = kernels
                if lora_decode in gemm_kernels:  # the joint GEMM at these 3-row steps too
                    from worker.layers import lora as lora_layer

                    lora_layer.JOINT_MIN_ROWS = 1
                    term = getattr(t.owner, t.attr).lora
                    term.decode = "gemm"
                    term.set_decode_kernels(gemm_kernels[lora_decode])
        load(mgr, 1, "a4")
        load(mgr, 2, "a16")
        results["pool_rank"] = torch.tensor([mgr.slots.rank])
        slots = [0, mgr.entries[1].slot, mgr.entries[2].slot]
        lp = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 12, 9)]
        paged_l = Paged(model, seed=7)
        ids = [10, 11, 12]
        out_l = paged_l.step(ids, lp, [0, 0, 0], [1.0, 3.0, 3.0], True, slots)
        for step in range(3):
            for k, o in enumerate(out_l):
                results[f"lora{step}_{k}"] = o
                lp[k].append(int(o[-1].argmax()))
            out_l = paged_l.step(ids, lp, [len(s) - 1 for s in lp], [1.0, 3.0, 3.0], False, slots)
    save_file({k: v.detach().cpu().contiguous() for k, v in results.items()}, f"{out}-{pctx.rank}.safetensors")
    shutdown(pctx)


if __name__ == "__main__":
    main()
