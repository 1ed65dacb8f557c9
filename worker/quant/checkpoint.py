"""A float Qwen v1 state dict -> GPTQ checkpoint tensors (AutoGPTQ names and layout), and its config entry.

Only the five linears of each block are quantized; wte, the norms and lm_head are kept as they are. Each
quantized linear `transformer.h.{i}.{module}` becomes `.qweight`, `.qzeros`, `.scales` (fp16), `.g_idx` and,
where the float layer has one, `.bias` (fp16). Used by scripts/quantize.py, the tests and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.quant.gptq_format import Quantized, quantize_rtn

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
# (weight [N, K], module name) -> the quantized tensors; default: round to nearest
Quantizer = Callable[[torch.Tensor, str], Quantized]


def is_quantized_linear(name: str) -> bool:
    """`name` is the .weight of one of a block's five linears."""
    return name.startswith("transformer.h.") and any(name.endswith(f".{m}.weight") for m in LINEARS)


def quantize_state(
    state: dict[str, torch.Tensor],
    bits: int,
    group_size: int,
    sym: bool,
    perm_of: Callable[[str, int], torch.Tensor | None] | None = None,
    quantizer: Quantizer | None = None,
) -> dict[str, torch.Tensor]:
    """GPTQ tensors for `state`. perm_of(module, K): an act-order row permutation (None: no act order); the
    merged w1/w2 pair shares its input, so callers give both the same one."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not is_quantized_linear(name):
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        if quantizer is not None:
            q = quantizer(t, prefix)
        else:
            perm = perm_of(prefix, t.shape[1]) if perm_of is not None else None
            q = quantize_rtn(t.float(), bits, group_size, sym, perm)
        out.update(
            {
                f"{prefix}.qweight": q.qweight,
                f"{prefix}.qzeros": q.qzeros,
                f"{prefix}.scales": q.scales,
                f"{prefix}.g_idx": q.g_idx,
            }
        )
    for name in list(out):
        if name.endswith(".bias") and f"{name[: -len('.bias')]}.qweight" in out:
            out[name] = out[name].to(torch.float16)
    return out


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool) -> dict[str, object]:
    """The `quantization_config` AutoGPTQ writes (v1 zero points: no checkpoint_format key)."""
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
    }
