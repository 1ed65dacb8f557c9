"""CUDA graphs for small span steps: a few rows, each computing a run of tokens after its cached prefix
(a prompt's suffix after a prefix-cache hit, a chunk's tail); engine/graphed_verify.py builds on it for
speculative verify steps (every token's logits).

An eager 32-layer forward of 128 tokens spends about half its time launching kernels; a graph per
(rows, tokens) bucket replays the same kernels from static inputs. Bucket (R, T) has R + 1 sequences: rows
[0, n) are the step's, rows [n, R) are empty (no tokens), and row R, the pad row, takes the T - T_real
spare tokens; empty and pad rows read and write only the scratch block, and their logits are dropped. The
paged prefill kernel's grid depends only on (T, R + 1), so one launch shape serves every step of a bucket.

Graphs run only steps that the eager path would also send through the paged prefill kernel (some row has a
cached prefix; no adapters, no prompt logprobs, no drafts), so they launch the same kernels on the same rows; with
T_real == T the logits are bitwise those of the eager path (a padded step may differ in the last bits where
cuBLAS picks another GEMM for the larger row count).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from worker.distributed import ParallelContext
from worker.engine.batch import Batch
from worker.engine.chunks import RowSpan, default_span
from worker.engine.config import EngineConfig
from worker.engine.cuda_graphs import capture
from worker.engine.kv_cache import KVCache
from worker.layers.context import ForwardContext, Seqlen
from worker.models.qwen import FlashQwenForCausalLM

log = logging.getLogger(__name__)

SPAN_ROWS = (1, 2, 4, 8, 16, 32)  # a verify step of 32 rows x 5 tokens fits (32, 192)
SPAN_TOKENS = (16, 32, 64, 128, 192, 256)


def span_buckets(rows: Sequence[int], tokens: Sequence[int]) -> list[tuple[int, int]]:
    """(R, T) pairs with T >= R (a step has at least one token per row, so smaller T never serve)."""
    return [(r, t) for r in sorted(rows) for t in sorted(tokens) if t >= r]


class GraphedSpans:
    """Span steps replayed from CUDA graphs, one per (rows, tokens) bucket. `graphs=False` runs the same
    static-buffer step eagerly (CPU tests of the padding; no capture)."""

    def __init__(
        self,
        model: FlashQwenForCausalLM,
        kv: KVCache,
        max_blocks_per_seq: int,
        scratch_block: int,
        rows: Sequence[int] = SPAN_ROWS,
        tokens: Sequence[int] = SPAN_TOKENS,
        graphs: bool = True,
        pool: Any = None,
        buckets: Sequence[tuple[int, int]] | None = None,
    ):
        """buckets: (R, T) pairs to serve instead of span_buckets(rows, tokens); pool: a graph memory pool to
        share (graphs of one runner replay one at a time and their outputs are copied out)."""
        dev = model.pctx.device
        self.model, self.kv = model, kv
        self.max_blocks, self.scratch_block = max_blocks_per_seq, scratch_block
        self.buckets = list(buckets) if buckets is not None else span_buckets(rows, tokens)
        if not self.buckets:
            raise ValueError(f"no span bucket with tokens >= rows (rows {list(rows)}, tokens {list(tokens)})")
        r_max, t_max = max(r for r, _ in self.buckets), max(t for _, t in self.buckets)
        self.max_rows, self.max_tokens = r_max, t_max
        long, i32 = torch.long, torch.int32
        self.ids, self.pos, self.slots = (torch.zeros(t_max, dtype=long, device=dev) for _ in range(3))
        self.alpha = torch.ones(t_max, dtype=torch.float32, device=dev)
        self.head = torch.zeros(r_max, dtype=long, device=dev)
        self.cu = torch.zeros(r_max + 2, dtype=i32, device=dev)
        self.cache_lens, self.lengths = (torch.zeros(r_max + 1, dtype=i32, device=dev) for _ in range(2))
        self.seq_alpha = torch.ones(r_max + 1, dtype=torch.float32, device=dev)
        self.tables = torch.zeros(r_max + 1, max_blocks_per_seq, dtype=i32, device=dev)
        self.steps = {b: self._step(*b) for b in self.buckets}
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        if graphs:
            # not the decode graphs' pool: their outputs (a look-ahead's logits) must stay intact
            self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
            with torch.inference_mode():
                for b in sorted(self.buckets, key=lambda b: (-b[1], -b[0])):  # largest first: one pool size
                    self.fill_padding(*b)  # valid metadata while warming up
                    self.graphs[b] = capture(self.steps[b], self.pool)

    def _step(self, R: int, T: int) -> Callable[[], torch.Tensor]:
        """Bucket (R, T)'s forward: the logits of each row's last token (row i's at head[i])."""
        context = self._context(R, T)

        def step() -> torch.Tensor:
            return self.model.forward_context(self.ids[:T], context(self.head[:R]), self.kv.layers)

        return step

    def _context(self, R: int, T: int) -> Callable[[torch.Tensor | None], ForwardContext]:
        """Bucket (R, T)'s ForwardContext over the static buffers, built inside the captured function (its
        rotary tables are the graph's); the argument picks the rows that get logits (None: every token)."""
        model, bs = self.model, self.kv.block_size
        # max_cache_len 1 (> 0): attention takes the paged prefill path, as the eager path does for these steps
        seqlen = Seqlen(
            self.lengths[: R + 1],
            self.cache_lens[: R + 1],
            self.cu[: R + 2],
            T,
            self.max_blocks * bs,
            self.seq_alpha[: R + 1],
            1,
        )

        def context(head: torch.Tensor | None) -> ForwardContext:
            return ForwardContext.build(
                model.rotary,
                is_prefill=True,
                positions=self.pos[:T],
                seqlen=seqlen,
                slots=self.slots[:T],
                block_tables=self.tables[: R + 1],
                lm_head_indices=head,
                token_alpha=self.alpha[:T],  # seqlen's per-sequence alpha would need a host sync to repeat
            )

        return context

    def bucket(self, batch: Batch, spans: Sequence[RowSpan], adapter_slots: list[int] | None) -> tuple[int, int] | None:
        """The smallest bucket serving this step, or None where the eager path must run it."""
        if any(adapter_slots or []):
            return None
        if any(sp.prompt_logits or sp.drafts for sp in spans):
            return None  # prompt logprobs, verify rows: every token's logits (engine/graphed_verify.py)
        return self.smallest(batch, spans)

    def smallest(self, batch: Batch, spans: Sequence[RowSpan]) -> tuple[int, int] | None:
        """The smallest bucket holding the step's rows and tokens (drafts included), or None: too many, fresh
        prompts only (eager: varlen attention, not the paged kernel), or a block table wider than the graphs'."""
        reqs = batch.requests
        n, total = len(reqs), sum(sp.n_tokens for sp in spans)
        if n > self.max_rows or total > self.max_tokens or all(sp.start == 0 for sp in spans):
            return None
        if any(len(r.blocks) > self.max_blocks for r in reqs):
            return None
        fits = [b for b in self.buckets if b[0] >= n and b[1] >= total]
        return min(fits, key=lambda b: (b[1], b[0])) if fits else None

    def fill_padding(self, R: int, T: int) -> None:
        """Bucket (R, T)'s inputs for a step of no rows: every token on the pad row, in the scratch block."""
        self._fill(R, T, [], [], [], [], [], [])

    def _fill(
        self,
        R: int,
        T: int,
        ids: list[int],
        slots: list[int],
        starts: list[int],
        counts: list[int],
        alphas: list[float],
        tables: list[list[int]],
    ) -> None:
        n, used, bs = len(counts), sum(counts), self.kv.block_size
        pad = T - used
        tok = np.zeros((3, T), dtype=np.int64)  # ids, positions, slots
        tok[0, :used] = ids
        tok[2, :used] = slots
        tok[1, used:] = np.arange(pad)
        tok[2, used:] = self.scratch_block * bs + np.arange(pad) % bs
        alpha = np.ones(T, dtype=np.float32)
        seq = np.zeros((3, R + 1), dtype=np.int32)  # cache lengths, lengths, new tokens
        seq[:, R] = (0, pad, pad)
        seq_alpha = np.ones(R + 1, dtype=np.float32)
        table = np.full((R + 1, self.max_blocks), self.scratch_block, dtype=np.int32)
        head = np.zeros(R, dtype=np.int64)
        offset = 0
        for i, (start, cnt) in enumerate(zip(starts, counts)):
            tok[1, offset : offset + cnt] = np.arange(start, start + cnt)
            alpha[offset : offset + cnt] = alphas[i]
            seq[:, i] = (start, start + cnt, cnt)
            seq_alpha[i] = alphas[i]
            table[i, : len(tables[i])] = tables[i]
            offset += cnt
            head[i] = offset - 1
        cu = np.concatenate([[0], np.cumsum(seq[2])]).astype(np.int32)
        assert n <= R and cu[-1] == T
        for dst, src in (
            (self.ids[:T], tok[0]),
            (self.pos[:T], tok[1]),
            (self.slots[:T], tok[2]),
            (self.alpha[:T], alpha),
            (self.cache_lens[: R + 1], seq[0]),
            (self.lengths[: R + 1], seq[1]),
            (self.cu[: R + 2], cu),
            (self.seq_alpha[: R + 1], seq_alpha),
            (self.tables[: R + 1], table),
            (self.head[:R], head),
        ):
            dst.copy_(torch.from_numpy(src), non_blocking=True)

    def try_run(
        self, batch: Batch, spans: Sequence[RowSpan] | None, adapter_slots: list[int] | None
    ) -> torch.Tensor | None:
        """Last-token logits [B, V] of a span step (spans None: each request's whole remaining prompt) from its
        bucket's graph, marking the spans computed; None (nothing run) where the eager path must run it."""
        reqs = batch.requests
        spans = spans if spans is not None else [default_span(r, True) for r in reqs]
        b = self.bucket(batch, spans, adapter_slots)
        if b is None:
            return None
        out = self.replay(b, batch, spans)
        return out[: len(reqs)].clone()  # the next replay of any bucket may reuse this memory

    def replay(self, b: tuple[int, int], batch: Batch, spans: Sequence[RowSpan]) -> torch.Tensor:
        """Fill bucket b's inputs with the step's rows (each row's ids[start:stop], then its drafts at the
        next positions and slots), run its graph (its step, eagerly, without graphs), mark the spans computed;
        the bucket's output, valid until the next replay."""
        reqs = batch.requests
        ids: list[int] = []
        slots: list[int] = []
        for r, sp in zip(reqs, spans):
            ids += r.ids[sp.start : sp.stop] + list(sp.drafts)
            slots += r.slots[sp.start : sp.start + sp.n_tokens]
        self._fill(
            *b,
            ids,
            slots,
            [sp.start for sp in spans],
            [sp.n_tokens for sp in spans],
            [r.ntk_alpha for r in reqs],
            [r.blocks for r in reqs],
        )
        if self.graphs:
            graph, out = self.graphs[b]
            graph.replay()
        else:
            out = self.steps[b]()
        for r, sp in zip(reqs, spans):
            r.n_cached = sp.stop
        return out


def capture_spans(model: FlashQwenForCausalLM, kv: KVCache, pctx: ParallelContext, cfg: EngineConfig) -> GraphedSpans:
    """Span-step graphs (engine/graphed_spans.py) beside the decode graphs, sharing their scratch block."""
    t0, free0 = time.time(), torch.cuda.mem_get_info(pctx.device)[0]
    spans = GraphedSpans(model, kv, math.ceil(cfg.max_seq_len / cfg.block_size), kv.num_blocks - 1)
    mib = (free0 - torch.cuda.mem_get_info(pctx.device)[0]) / 2**20
    log.info("CUDA graphs: %d span buckets captured in %.1fs, %.0f MiB", len(spans.graphs), time.time() - t0, mib)
    return spans
