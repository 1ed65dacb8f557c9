"""CUDA graphs for decode: one graph per batch-size bucket, static input tensors, replay per step.

The decode forward (model + Triton attention with a fixed split count) makes no host syncs, so it
can be captured; inputs live in static buffers that each step overwrites before replay (`prepare_ahead`: all but
the token ids, which a device copy fills just before the replay).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worker.engine.batch import Batch
from worker.engine.kv_cache import KVCache
from worker.layers.context import ForwardContext, Seqlen
from worker.layers.lora import AdapterBatchData
from worker.models.qwen import FlashQwenForCausalLM


def capture(
    fn: Callable[[], torch.Tensor], pool: Any = None, warmup: int = 2
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture `fn` (reading only static tensors) into a graph; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to max_batch (as vLLM does, so padding stays small)."""
    sizes = [b for b in (1, 2, 4) if b <= max_batch]
    sizes += list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


class GraphedDecode:
    """Decode steps replayed from CUDA graphs, one per batch-size bucket (and with/without LoRA; and, where the
    attention backend's decode takes other forms from some context length on (`long_decode`: a length for each bucket
    it names), those buckets twice: a graph for steps below their length, whose Seqlen.max_k stops short of it, and
    one for the rest).

    Rows past the real batch are padding: they write their K/V into a scratch block that no request
    owns and their logits are dropped.
    """

    def __init__(
        self,
        model: FlashQwenForCausalLM,
        kv: KVCache,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        adapter_pools: bool,
    ):
        dev = model.pctx.device
        self.model, self.kv = model, kv
        self.max_blocks = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.fills = 0  # static-input fills so far (prepare_ahead checks none came between it and its launch)
        self.sizes = bucket_sizes(max_batch)
        n = self.sizes[-1]
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.lengths = torch.ones(n, dtype=torch.int32, device=dev)
        self.cache_lengths = torch.zeros(n, dtype=torch.int32, device=dev)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.alpha = torch.ones(n, dtype=torch.float32, device=dev)
        self.adapter_slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (bs, lora, long)
        # every tensor a graph reads must outlive it: the graph keeps raw pointers, not references
        # (for_decode's row/segment tensors, freed and reused, were read as garbage slot ids at replay)
        self.inputs: dict[tuple[int, bool, bool], tuple[object, object]] = {}
        self.has_lora = adapter_pools  # also capture the adapter variant of every bucket
        self.pool = torch.cuda.graph_pool_handle()
        backend: Any = model.backend  # the triton backend has num_splits and tiles
        longest = max_blocks_per_seq * kv.block_size
        long: dict[int, int] | None = None
        if hasattr(backend, "long_decode"):
            long = backend.long_decode(kv.dtype, kv.head_dim)
        # the buckets of bs rows in long_tokens have a graph for steps below long_tokens[bs] tokens and one for the rest
        self.long_tokens = {bs: t for bs, t in (long or {}).items() if bs in self.sizes and longest >= t}
        self.sm = torch.cuda.get_device_properties(dev).multi_processor_count
        self._point_at_scratch()
        self._capture(
            [
                (bs, lora, is_long)
                for lora in ([False, True] if adapter_pools else [False])
                for bs in reversed(self.sizes)  # largest first: the pool is sized once
                for is_long in ([False, True] if bs in self.long_tokens else [False])
            ]
        )

    def _capture(self, keys: list[tuple[int, bool, bool]]) -> None:
        model, kv = self.model, self.kv
        backend: Any = model.backend
        longest = self.max_blocks * kv.block_size
        heads = model.config.num_attention_heads // model.pctx.world_size
        for bs, lora, is_long in keys:
            # the graph's longest context: below long_tokens[bs] where the bucket has a long graph beside it
            max_k = self.long_tokens[bs] - 1 if bs in self.long_tokens and not is_long else longest
            seqlen = Seqlen(self.lengths[:bs], self.cache_lengths[:bs], self.cu[: bs + 1], 1, max_k, self.alpha[:bs])
            data = AdapterBatchData.for_decode(self.adapter_slots[:bs]) if lora else None
            splits = None
            if hasattr(backend, "num_splits"):  # the backend's split policy at the longest context a graph sees
                splits = backend.tiles.decode_splits(bs, heads, longest, self.sm)

            def step(bs: int = bs, seqlen: Seqlen = seqlen, data: AdapterBatchData | None = data) -> torch.Tensor:
                ctx = ForwardContext.build(
                    model.rotary,
                    is_prefill=False,
                    positions=self.pos[:bs],
                    seqlen=seqlen,
                    slots=self.slots[:bs],
                    block_tables=self.tables[:bs],
                    adapter_data=data,
                )
                return model.forward_context(self.ids[:bs], ctx, kv.layers)

            old = getattr(backend, "num_splits", None)
            if splits is not None:
                backend.num_splits = splits
            self.inputs[(bs, lora, is_long)] = (seqlen, data)
            try:
                with torch.inference_mode():
                    self.graphs[(bs, lora, is_long)] = capture(step, self.pool)
            finally:
                if splits is not None:
                    backend.num_splits = old

    def recapture_adapters(self) -> int:
        """Capture the buckets' adapter variants again (the adapter pools were re-laid out: their graphs read the old
        views); the graphs without adapters stay. The adapter variants are dropped first, and stay dropped (steps
        with adapters then run eagerly: `has_lora` False) if a capture fails. Returns how many were captured."""
        keys = [k for k in self.graphs if k[1]]
        for k in keys:
            del self.graphs[k], self.inputs[k]
        self.fills += 1  # a prepare_ahead before this would replay a dropped graph: its launch refuses
        self.has_lora = False
        self._point_at_scratch()  # the captures' warm-up steps run for real: they write K/V where the inputs say
        self._capture(keys)
        self.has_lora = bool(keys)
        return len(keys)

    def _point_at_scratch(self) -> None:
        """Every row of the static inputs a padding row: its K/V slot and block table in the scratch block, which no
        request owns (the inputs otherwise hold the last step's rows, whose blocks live requests may hold now)."""
        size = self.kv.block_size
        self.slots.fill_(self.scratch_block * size)
        self.tables.fill_(self.scratch_block)
        self.lengths.fill_(1)
        self.cache_lengths.zero_()
        self.pos.zero_()
        self.ids.zero_()
        self.adapter_slots.zero_()

    def can_run(self, batch: Batch, ahead: bool = False) -> bool:
        """ahead: for the step after the one whose tokens are being chosen (a position further on)."""
        if len(batch.requests) > self.sizes[-1] or any(len(r.blocks) > self.max_blocks for r in batch.requests):
            return False
        return not ahead or all(len(r.ids) // self.kv.block_size < self.max_blocks for r in batch.requests)

    def run(self, batch: Batch, adapter_slots: list[int] | None) -> torch.Tensor:
        """Fill the static inputs for this batch (padding rows point at the scratch block) and replay."""
        graph, out = self._fill(batch, adapter_slots, ahead=False)
        graph.replay()
        for r in batch.requests:
            r.n_cached = len(r.ids)
        return out[: len(batch.requests)]

    def prepare_ahead(self, batch: Batch, adapter_slots: list[int] | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The decode of each request's next token, before the host knows it: every input but the token ids is
        filled now (position len(ids), slot `slot_at`); the returned launch copies the ids [B] from the device
        into the graph's input and replays, so the forward follows the sampler without a host sync. The static
        inputs are shared by every bucket: a fill in between (another batch's step) would make the launch write K/V
        at that batch's slots, so the launch refuses then."""
        graph, out = self._fill(batch, adapter_slots, ahead=True)
        n, fill = len(batch.requests), self.fills

        def launch(ids: torch.Tensor) -> torch.Tensor:
            if self.fills != fill:
                raise RuntimeError("decode graph inputs were refilled between prepare_ahead and its launch")
            self.ids[:n].copy_(ids, non_blocking=True)
            graph.replay()
            return out[:n]

        return launch

    def _fill(
        self, batch: Batch, adapter_slots: list[int] | None, ahead: bool
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Copy the batch's inputs into the static buffers; the bucket's graph and output. ahead: each row's
        position is len(ids), its token comes later (prepare_ahead)."""
        self.fills += 1
        reqs = batch.requests
        n = len(reqs)
        bs = next(s for s in self.sizes if s >= n)
        scratch, size = self.scratch_block, self.kv.block_size
        tables = np.full((bs, self.max_blocks), scratch, dtype=np.int32)
        ints = np.zeros((5, bs), dtype=np.int64)  # ids, positions, slots, lengths, cache lengths
        ints[2, n:] = scratch * size
        ints[3, n:] = 1
        alpha = np.ones(bs, dtype=np.float32)
        most = 0  # the step's longest context
        for i, r in enumerate(reqs):
            tables[i, : len(r.blocks)] = r.blocks
            pos = len(r.ids) - 1 + ahead
            slot = r.slots[pos] if not ahead else slot_at(r.slots, r.blocks, pos, scratch, size)
            ints[:, i] = (r.ids[-1], pos, slot, pos + 1, pos)
            most = max(most, pos + 1)
            alpha[i] = r.ntk_alpha
        ints_t = torch.from_numpy(ints)
        self.ids[:bs].copy_(ints_t[0], non_blocking=True)
        self.pos[:bs].copy_(ints_t[1], non_blocking=True)
        self.slots[:bs].copy_(ints_t[2], non_blocking=True)
        self.lengths[:bs].copy_(ints_t[3], non_blocking=True)
        self.cache_lengths[:bs].copy_(ints_t[4], non_blocking=True)
        self.tables[:bs].copy_(torch.from_numpy(tables), non_blocking=True)
        self.alpha[:bs].copy_(torch.from_numpy(alpha), non_blocking=True)
        slots = list(adapter_slots or [])
        lora = any(slots)
        if lora:
            self.adapter_slots[:bs].copy_(torch.tensor(slots + [0] * (bs - n)), non_blocking=True)
        self.last_key = (bs, lora, bs in self.long_tokens and most >= self.long_tokens[bs])  # for benchmarks to replay
        return self.graphs[self.last_key]  # (bs, True, ...) exists whenever adapters are enabled


def slot_at(slots: list[int], blocks: list[int], pos: int, scratch_block: int, block_size: int) -> int:
    """The KV slot a request writes at `pos`: its own, else (a position past its slots: the request stops at the
    token before, so the K/V are never read) one in its own block there, else in the scratch block, which no
    request owns and which the block tables name past a request's blocks."""
    if pos < len(slots):
        return slots[pos]
    block = blocks[pos // block_size] if pos // block_size < len(blocks) else scratch_block
    return block * block_size + pos % block_size
