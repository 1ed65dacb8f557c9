"""A minimal paged driver for FlashQwenForCausalLM used by model and TP tests (independent of the
engine): shuffled non-contiguous blocks, prefill / suffix prefill / decode of a mixed batch."""

from __future__ import annotations

import random

import torch

from worker.engine.kv_cache import KVCache
from worker.layers.context import Seqlen
from worker.models.qwen import FlashQwenForCausalLM

BLOCK = 4


class Paged:
    """Drives FlashQwenForCausalLM through prefill / decode over a paged cache, like a runner would."""

    def __init__(
        self, model: FlashQwenForCausalLM, num_blocks: int = 96, seed: int = 0, kv_dtype: torch.dtype | None = None
    ):
        """kv_dtype: the cache dtype (None: the model's). An fp8 cache starts with scales 1.0; its scales
        reach the model's layers in `step` (the model may be shared with other drivers)."""
        c = model.config
        self.model = model
        heads = c.num_attention_heads // model.pctx.world_size
        self.device = model.pctx.device
        self.cache = KVCache(
            c.num_hidden_layers, num_blocks, BLOCK, heads, c.head_dim, kv_dtype or model.dtype, self.device
        )
        self.free = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free)  # non-contiguous, out-of-order blocks
        self.blocks: list[list[int]] = []

    def _slots(self, i: int, start: int, stop: int) -> list[int]:
        need = (stop + BLOCK - 1) // BLOCK
        while len(self.blocks[i]) < need:
            self.blocks[i].append(self.free.pop())
        return [self.blocks[i][p // BLOCK] * BLOCK + p % BLOCK for p in range(start, stop)]

    def _table(self, idx: list[int]) -> torch.Tensor:
        width = max(len(self.blocks[i]) for i in idx)
        return torch.tensor(
            [self.blocks[i] + [0] * (width - len(self.blocks[i])) for i in idx], dtype=torch.int32, device=self.device
        )

    def step(
        self,
        idx: list[int],
        seqs: list[list[int]],
        starts: list[int],
        alphas: list[float],
        prefill: bool,
        adapter_slots: list[int] | None = None,
    ) -> list[torch.Tensor]:
        """Compute tokens seqs[k][starts[k]:] of sequences idx; returns each one's logits [n_new, V]."""
        for i in idx:
            while len(self.blocks) <= i:
                self.blocks.append([])
        ids, pos, slots, lens = [], [], [], []
        for i, s, st in zip(idx, seqs, starts):
            ids += s[st:]
            pos += list(range(st, len(s)))
            slots += self._slots(i, st, len(s))
            lens.append(len(s) - st)
        seqlen = Seqlen.for_prefill(lens, starts, alphas, device=self.device)
        adapter_data = None
        if adapter_slots is not None:
            from worker.layers.lora import AdapterBatchData

            adapter_data = AdapterBatchData.build(adapter_slots, lens, self.device)
        dev = self.device
        if self.cache.is_fp8:
            self.model.set_kv_scales(self.cache.k_scales, self.cache.v_scales)
        else:
            self.model.set_kv_scales(None, None)
        logits, _ = self.model(
            torch.tensor(ids, device=dev),
            torch.tensor(pos, device=dev),
            seqlen.cu_seqlen_q if prefill else None,
            self.cache.layers,
            self._table(idx),
            torch.tensor(slots, device=dev),
            seqlen,
            seqlen.max_k,
            adapter_data,
        )
        return list(logits.split(lens))
