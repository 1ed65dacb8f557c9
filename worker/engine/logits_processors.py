"""Stateless row-wise operations on logits: the processors BatchSampler applies (engine/sampling.py), and the
prompt tokens' log-probs that prefill reports (engine/chunks.py).

Each takes [B, V] (or [T, V]) scores and treats every row on its own, so a row's result does not depend on the
rows batched with it.
"""

from __future__ import annotations

import math

import torch

PREFILL_CHUNK_ROWS = 1024  # bounds the fp32 copy of prompt logits in prefill_logprobs


def apply_token_bitmask(scores: torch.Tensor, bitmask: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """-inf for the tokens a bitmask leaves out, all rows in one pass on the scores' device. scores: [B, V] with
    V >= n_tokens, in place; bitmask: [B, ceil(n_tokens / 32)] int32, bit j of word w set when token 32·w + j
    is allowed (llguidance's layout; a row of -1 allows everything)."""
    batch = scores.shape[0]
    if bitmask.dtype != torch.int32 or tuple(bitmask.shape) != (batch, (n_tokens + 31) // 32):
        raise ValueError(f"bitmask for {batch} rows x {n_tokens} tokens got {bitmask.dtype} {tuple(bitmask.shape)}")
    words = bitmask.to(scores.device, non_blocking=True)  # [B, W]
    shifts = torch.arange(32, dtype=torch.int32, device=scores.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    scores[:, :n_tokens].masked_fill_(bits.view(batch, -1)[:, :n_tokens] == 0, -math.inf)
    return scores


def top_k_warp(scores: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep scores >= the k-th largest of each row (ties kept); k = 0 leaves the row alone. [B, V] in place."""
    k_max = max(top_k)
    kth = torch.topk(scores, k_max, dim=-1).values  # [B, k_max]
    index = torch.tensor([max(k, 1) - 1 for k in top_k], device=scores.device).unsqueeze(1)
    threshold = kth.gather(1, index)  # [B, 1]
    threshold[torch.tensor(top_k, device=scores.device) == 0] = -math.inf
    return scores.masked_fill_(scores < threshold, -math.inf)


def top_p_warp(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """HF nucleus filter: drop the low tail whose mass is <= 1 - top_p, keep the best token. top_p: [B, 1]."""
    sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = (cum <= 1 - top_p) & (top_p < 1.0)
    remove[:, -1] = False
    return scores.masked_fill_(remove.scatter(1, order, remove), -math.inf)


def typical_warp(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """HF typical-p filter (Meister et al.): keep the tokens whose surprise is closest to the entropy
    until their mass reaches `mass`. mass: [B, 1]; rows with mass 1 are left alone."""
    logp = torch.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = torch.sort(shifted, dim=-1)
    cum = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cum < mass).sum(dim=1, keepdim=True).clamp_(max=scores.shape[-1] - 1)
    remove = (sorted_shifted > sorted_shifted.gather(1, last)) & (mass < 1.0)
    remove[:, 0] = False
    return scores.masked_fill_(remove.scatter(1, order, remove), -math.inf)


def prefill_logprobs(logits: torch.Tensor, ids: torch.Tensor, n_real_vocab: int | None = None) -> torch.Tensor:
    """Log-prob of each prompt token under the raw logits of the position before it.

    logits: [T, V] (row t predicts token t+1); ids: [T]. Returns [T] fp32 with NaN at position 0.
    Only the first `n_real_vocab` columns count (the padded vocab is not part of the distribution).
    """
    n_tokens = ids.shape[0]
    if logits.shape[0] != n_tokens:
        raise ValueError(f"prefill_logprobs: {logits.shape[0]} logit rows for {n_tokens} ids")
    width = logits.shape[-1] if n_real_vocab is None else n_real_vocab
    out = torch.full((n_tokens,), math.nan, dtype=torch.float32, device=logits.device)
    for start in range(0, n_tokens - 1, PREFILL_CHUNK_ROWS):
        stop = min(start + PREFILL_CHUNK_ROWS, n_tokens - 1)
        rows = logits[start:stop, :width].float()  # [chunk, V]
        target = ids[start + 1 : stop + 1].to(device=logits.device, dtype=torch.int64).unsqueeze(1)
        out[start + 1 : stop + 1] = rows.gather(1, target).squeeze(1) - torch.logsumexp(rows, dim=-1)
    return out
