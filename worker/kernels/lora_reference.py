"""The PyTorch reference of the multi-LoRA kernels (worker/kernels/lora.py), torch only: the LoRA layers'
path where Triton is not used, and what the kernel tests compare against.

Segments are runs of token rows that share an adapter slot: `token_idx` [S, L] lists each segment's rows,
padded with row 0 where `valid` [S, L] is False; `slots` [S] is each segment's slot in the pool.
"""

from __future__ import annotations

import torch


def add_lora_part(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    token_idx: torch.Tensor,
    valid: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """y[t] += B[s] A[s] x[t] for every token t of a segment with slot s, in place.

    y: [T, out] (may be a column slice of a wider output); x: [T, in];
    a_pool: [slots, r_max, in]; b_pool: [slots, out, r_max].
    """
    xs = x[token_idx] * valid[..., None].to(x.dtype)  # [S, L, in]; padding rows are zero
    h = torch.bmm(xs, a_pool[slots].transpose(1, 2))  # [S, L, r_max]
    delta = torch.bmm(h, b_pool[slots].transpose(1, 2))  # [S, L, out]; zero on padding rows
    # no boolean indexing (a host sync, which CUDA-graph capture forbids): padding rows add exact zeros
    y.index_add_(0, token_idx.flatten(), delta.reshape(-1, delta.shape[-1]).to(y.dtype))


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    token_idx: torch.Tensor,
    valid: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """`add_lora_part` for each part p of a stacked pool: y[:, p·N:(p+1)·N] += B[s, p] A[s, p] x.

    y: [T, P·N]; a_pool: [slots, P, r_max, in]; b_pool: [slots, P, N, r_max]. Rank lanes past a slot's
    rank hold zeros, so no rank table is needed.
    """
    n = b_pool.shape[2]
    for p in range(a_pool.shape[1]):
        add_lora_part(y[:, p * n : (p + 1) * n], x, a_pool[:, p], b_pool[:, p], token_idx, valid, slots)
