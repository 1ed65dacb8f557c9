"""The GPTQ algorithm (Frantar et al. 2022, as AutoGPTQ runs it) for one linear, torch only.

Columns (input rows of W [N, K]) are quantized one at a time in blocks; each column's rounding error is
spread over the columns not yet quantized through the inverse Hessian H = 2 XᵀX / n of the layer's
calibration inputs. Group parameters come from the current (error-updated) weights at each group's first
column, scales rounded to fp16 first (the stored precision). Act order quantizes columns by decreasing
H diagonal; g_idx then maps each original row to its group.
"""

from __future__ import annotations

import torch

from worker.quant.gptq_format import Quantized, group_params, pack_cols, pack_rows


class Hessian:
    """Accumulates H = 2 XᵀX / n over calibration batches x [T, K]."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.h *= self.n / (self.n + x.shape[0])
        self.n += x.shape[0]
        self.h += (2.0 / self.n) * x.t() @ x


def gptq_quantize(
    weight: torch.Tensor,  # [N, K]
    hessian: torch.Tensor,  # [K, K]
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    damp: float = 0.01,
    block: int = 128,
) -> Quantized:
    n, k = weight.shape
    maxq = (1 << bits) - 1
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    size = k if group_size == -1 else group_size
    n_groups = -(-k // size)
    q = torch.zeros(n, k, dtype=torch.int64)  # in the permuted column order
    scales = torch.zeros(n_groups, n, dtype=torch.float16)
    zeros = torch.zeros(n_groups, n, dtype=torch.int64)
    scale = zero = torch.empty(0)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % size == 0:
                s, zero = group_params(torch.cat([w1[:, i:], w[:, i2:]], 1)[:, :size].t(), bits, sym)
                scales[col // size] = s.to(torch.float16)
                zeros[col // size] = zero
                scale = scales[col // size].double()
            qc = (torch.round(w1[:, i] / scale) + zero).clamp(0, maxq)
            q[:, col] = qc.to(torch.int64)
            err = (w1[:, i] - (qc - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    g_idx = (torch.arange(k) // size)[inv].to(torch.int32)  # original row -> its group
    return Quantized(pack_rows(q[:, inv].t(), bits), pack_cols(zeros - 1, bits), scales, g_idx)
