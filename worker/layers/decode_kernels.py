"""Opt-in decode kernel candidates for the batch-1 floor (issue 17, P1), chosen per model instance.

Every field defaults to off (today's kernels); scripts/gpu_check_p1.py times each against that and checks it
is exact before a default changes. A layer that reads these has `set_decode_kernels(opts)`;
`apply_decode_kernels` hands one DecodeKernels to every such layer of a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DecodeKernels:
    """pdl: the Triton GEMVs and fused elementwise kernels launch with programmatic dependent launch
    (worker/kernels/pdl.py), so each one's launch and ramp overlap the previous kernel's tail.
    act_gemv: mlp.c_proj (a float, un-wrapped row-parallel linear) at decode batches <= GEMV_MAX_M computes
    up * silu(gate) while reading its input in the Triton GEMV, and the SiLU-mul kernel disappears.
    norm_gemv: ln_1 / ln_2 (residual add + RMSNorm) run in the prologue of c_attn's / gate_up's Triton GEMV where
    that GEMV serves the decode batch (float, un-wrapped linears): two kernels a layer fewer.
    rope_store: RoPE (+ logn) and the KV-cache store in one kernel (caches in the model dtype, unscaled)."""

    pdl: bool = False
    act_gemv: bool = False
    norm_gemv: bool = False
    rope_store: bool = False


def apply_decode_kernels(root: nn.Module, opts: DecodeKernels) -> None:
    """Give `opts` to every layer under `root` that takes them (call before capturing CUDA graphs)."""
    for module in root.modules():
        setter = getattr(module, "set_decode_kernels", None)
        if setter is not None:
            setter(opts)
