"""The PyTorch reference of the GPTQ matmul kernels (worker/kernels/gptq.py): dequantize, then matmul.

y [M, N] = x [M, K] · W [K, N] (+ bias), W = (q − (z[g_idx] + zero_offset)) · s[g_idx] rounded once to
x's dtype; the matmul runs in x's dtype (fp32 on the CPU). Also `group_order`, the Triton-free row
reordering both the layers and the GEMV (worker/kernels/gemv.py) rely on.
"""

from __future__ import annotations

import torch

from worker.quant.gptq_format import dequantize, pack_rows, unpack_rows, untile_words


def gptq_matmul_reference(
    x: torch.Tensor,  # [M, K]
    qweight: torch.Tensor,  # int32 [K / P, N]
    qzeros: torch.Tensor,  # int32 [G, N / P]
    scales: torch.Tensor,  # [G, N]
    g_idx: torch.Tensor,  # int32 [K]
    bits: int,
    zero_offset: int = 1,
    bias: torch.Tensor | None = None,  # [N]
    group_size: int = 0,
    k_offset: int = 0,
    tiled: bool = False,
) -> torch.Tensor:
    """group_size, k_offset: the kernels' hint that g_idx[k] == (k_offset + k) // group_size; the
    reference always reads g_idx. tiled: qweight in gptq_format.tile_words' layout."""
    if tiled:
        qweight = untile_words(qweight)
    w = dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, x.dtype)  # [K, N]
    y = x @ w
    return y if bias is None else y + bias


def group_order(qweight: torch.Tensor, g_idx: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(qweight with its rows stably sorted by group, the permutation or None when already sorted): the
    matmul of the permuted rows with x[:, perm] is the same sum (act order costs one gather of x per call)."""
    order = torch.argsort(g_idx.long(), stable=True)
    if bool((order == torch.arange(order.numel(), device=order.device)).all()):
        return qweight, None
    return pack_rows(unpack_rows(qweight, bits)[order], bits), order
