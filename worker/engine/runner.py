"""Batch → model inputs (the seed's forward arguments) → logits.

Prefill computes each request's tokens `ids[n_cached:]`; decode computes each request's last token.
Logits come back only for the tokens that need them (the last of each request, and every computed
prompt token of requests that asked for prefill logprobs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from worker.engine.batch import Batch
from worker.engine.cuda_graphs import GraphedDecode
from worker.engine.kv_cache import KVCache
from worker.layers.context import Seqlen
from worker.layers.lora import AdapterBatchData
from worker.models.qwen import FlashQwenForCausalLM


@dataclass
class StepLogits:
    last: torch.Tensor  # [B, V]: logits for each request's next token
    prompt: dict[int, torch.Tensor]  # request position in batch -> [n_computed, V] (prefill logprobs only)


class Runner:
    def __init__(self, model: FlashQwenForCausalLM, kv: Optional[KVCache], device: torch.device,
                 graphs: Optional[GraphedDecode] = None):
        self.model = model
        self.kv = kv
        self.device = device
        self.graphs = graphs  # CUDA graphs for decode (None: eager)

    def _block_table(self, batch: Batch) -> torch.Tensor:
        width = max(len(r.blocks) for r in batch.requests)
        rows = [r.blocks + [0] * (width - len(r.blocks)) for r in batch.requests]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    @torch.inference_mode()
    def forward(self, batch: Batch, prefill: bool, adapter_slots: Optional[list[int]] = None) -> StepLogits:
        """adapter_slots: the adapter pool slot of each request (0: base), or None when none uses one."""
        if not prefill and self.graphs is not None and self.graphs.can_run(batch) and (
                adapter_slots is None or self.graphs.has_lora):
            return StepLogits(last=self.graphs.run(batch, adapter_slots), prompt={})
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        n_new: list[int] = []
        cache_lens: list[int] = []
        head: list[int] = []
        prompt_rows: dict[int, tuple[int, int]] = {}
        for i, r in enumerate(batch.requests):
            start = r.n_cached if prefill else len(r.ids) - 1
            stop = len(r.ids)
            offset = len(ids)
            ids += r.ids[start:stop]
            pos += range(start, stop)
            slots += r.slots[start:stop]
            n_new.append(stop - start)
            cache_lens.append(start)
            if prefill and r.prefill_logprobs:
                prompt_rows[i] = (len(head), stop - start)
                head += range(offset, offset + stop - start)
            else:
                head.append(offset + stop - start - 1)
        dev = self.device
        seqlen = Seqlen.for_prefill(n_new, cache_lens, [r.ntk_alpha for r in batch.requests], device=dev)
        lm_head_indices = torch.tensor(head, dtype=torch.long, device=dev)
        adapter_data = None if adapter_slots is None else AdapterBatchData.build(adapter_slots, n_new, dev)
        logits, _ = self.model(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            position_ids=torch.tensor(pos, dtype=torch.long, device=dev),
            cu_seqlen_prefill=seqlen.cu_seqlen_q if prefill else None,
            kv_cache=self.kv.layers,
            block_tables=self._block_table(batch),
            slots=torch.tensor(slots, dtype=torch.long, device=dev),
            seqlen=seqlen,
            max_s=seqlen.max_k,
            adapter_data=adapter_data,
            lm_head_indices=lm_head_indices,
        )
        for r in batch.requests:
            r.n_cached = len(r.ids)
        last_rows, prompt = [], {}
        cursor = 0
        for i in range(len(batch.requests)):
            if i in prompt_rows:
                s, n = prompt_rows[i]
                prompt[i] = logits[s:s + n]
                last_rows.append(s + n - 1)
                cursor = s + n
            else:
                last_rows.append(cursor)
                cursor += 1
        return StepLogits(last=logits[torch.tensor(last_rows, device=logits.device)], prompt=prompt)

    @torch.inference_mode()
    def forward_no_cache(self, lengths: list[int], ids: list[int], alphas: list[float],
                         kv_amax: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A prefill that writes no KV (Warmup's memory probe, Health): last-token logits [B, V].
        kv_amax ([layers, 2] fp32, updated in place): each layer's max |k|, |v| (fp8 KV calibration)."""
        dev = self.device
        seqlen = Seqlen.for_prefill(lengths, None, alphas, device=dev)
        pos = [p for n in lengths for p in range(n)]
        last = torch.cumsum(torch.tensor(lengths, device=dev), 0) - 1
        ctx = self.model.make_context(torch.tensor(pos, dtype=torch.long, device=dev), seqlen.cu_seqlen_q, None,
                                      None, seqlen, last, None)
        ctx.kv_amax = kv_amax
        return self.model.forward_context(torch.tensor(ids, dtype=torch.long, device=dev), ctx, None)
