"""CUDA graphs for speculative verify steps: rows of a decode token and its drafts (engine/speculative.py),
with logits at every token, and the Medusa heads' logits when the base speculator serves every row.

An eager verify step of a 32-layer model is mostly kernel launches (a few tokens per row). GraphedVerify is
GraphedSpans (engine/graphed_spans.py: static buffers, empty rows, a pad row in the scratch block, the paged
prefill kernel) with graphs that return the logits of all T tokens of their bucket; the host gathers the rows
the eager path computes (every token of a row with prompt_logits, the last of the others), so a step whose
tokens fill its bucket exactly gets bitwise the eager path's logits (the same GEMM shapes throughout).

Buckets are only those a verify step of S drafts can hit: R rows (1, 2, 4, .. 32) by R·(j + 1) tokens (every
row with j drafts: exact) for j in 1, 2, 4, 8, 16 and S, up to VERIFY_MAX_TOKENS (a larger step launches
enough work per kernel to run eagerly; its [T, V] logits would size the graphs' memory pool); one row gets
every j in 1..S (batch 1 is the common case: a row of 1 + j tokens replays bucket (1, 1 + j) exactly). Steps
with adapters run eagerly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from worker.distributed import ParallelContext
from worker.engine.batch import Batch
from worker.engine.chunks import RowSpan
from worker.engine.config import EngineConfig
from worker.engine.graphed_spans import SPAN_ROWS, GraphedSpans
from worker.engine.kv_cache import KVCache
from worker.engine.speculative import Speculation
from worker.layers.medusa import MedusaHeads
from worker.models.qwen import FlashQwenForCausalLM

log = logging.getLogger(__name__)

VERIFY_MAX_TOKENS = 256  # 32 rows x (1 + 4 drafts) fit; logits [256, 151936] bf16 are 78 MiB (x K + 1 with v2 heads)


def verify_buckets(rows: Sequence[int], drafts: int, max_tokens: int = VERIFY_MAX_TOKENS) -> list[tuple[int, int]]:
    """(R, T) pairs a verify step of up to `drafts` drafts per row fills exactly when its rows have j drafts
    each: j in 1..drafts for one row, j in 1, 2, 4, 8, 16 and `drafts` for more; T <= max_tokens."""
    out = set()
    for r in rows:
        js = range(1, drafts + 1) if r == 1 else [j for j in (1, 2, 4, 8, 16, drafts) if j <= drafts]
        out |= {(r, r * (j + 1)) for j in js if r * (j + 1) <= max_tokens}
    return sorted(out)


@dataclass
class VerifyLogits:
    """StepLogits' fields (engine/runner.py), as the eager span path builds them."""

    last: torch.Tensor  # [B, V]
    prompt: dict[int, torch.Tensor]  # rows with prompt_logits: [n_tokens, V]
    speculative: list[torch.Tensor | None] | None  # per request [n_rows, K, V] (the Medusa heads'), or None


class GraphedVerify(GraphedSpans):
    """Verify (and other span) steps replayed from graphs that compute every token's logits, and the base
    Medusa heads' logits when heads were attached at capture. `graphs=False`: the same steps, run eagerly."""

    def __init__(
        self,
        model: FlashQwenForCausalLM,
        kv: KVCache,
        max_blocks_per_seq: int,
        scratch_block: int,
        drafts: int,
        rows: Sequence[int] = SPAN_ROWS,
        graphs: bool = True,
        pool: Any = None,
    ):
        # the graphs read these heads' weights by pointer: other heads attached later are served eagerly
        self.heads: MedusaHeads | None = model.medusa.base
        self.spec_out: dict[tuple[int, int], torch.Tensor] = {}  # each bucket's Medusa logits [T, K, V]
        self.verify_steps = {"graphed": 0, "eager": 0}  # steps with drafts offered to try_verify, by outcome
        buckets = verify_buckets(rows, drafts)
        super().__init__(model, kv, max_blocks_per_seq, scratch_block, graphs=graphs, pool=pool, buckets=buckets)

    def _step(self, R: int, T: int) -> Callable[[], torch.Tensor]:
        """Bucket (R, T)'s forward: logits [T, V] of every token; with heads, their logits [T, K, V] go to
        spec_out (the last call's: under capture, the graph's output)."""
        context, model, layers = self._context(R, T), self.model, self.kv.layers
        if self.heads is None:
            return lambda: model.forward_context(self.ids[:T], context(None), layers)

        def step() -> torch.Tensor:
            logits, spec = model.forward_speculative(self.ids[:T], context(None), layers, None)
            assert spec is not None
            self.spec_out[(R, T)] = spec
            return logits

        return step

    def bucket(self, batch: Batch, spans: Sequence[RowSpan], adapter_slots: list[int] | None) -> tuple[int, int] | None:
        """The smallest bucket serving this step, or None where the eager path must run it (adapters)."""
        return None if any(adapter_slots or []) else self.smallest(batch, spans)

    def serves(self, speculative: bool) -> bool:
        """Whether the graphs give the logits asked for: with heads at capture, only the speculative forward's
        (the v2 heads' logits come out of one LM head call over [h, r_1..r_K]) and only while those heads are
        still the base speculator's; without, only the plain forward's."""
        if self.heads is None:
            return not speculative
        return speculative and self.model.medusa.base is self.heads

    def try_verify(
        self, batch: Batch, spans: Sequence[RowSpan], adapter_slots: list[int] | None, speculative: bool
    ) -> VerifyLogits | None:
        """The step's logits as the eager span path returns them (speculative: with the Medusa logits), from
        its bucket's graph, marking the spans computed; None (nothing run) where the eager path must run it."""
        bucket = self.bucket(batch, spans, adapter_slots) if self.serves(speculative) else None
        if any(sp.drafts for sp in spans):
            self.verify_steps["eager" if bucket is None else "graphed"] += 1
        if bucket is None:
            return None
        out = self.replay(bucket, batch, spans)
        rows: list[int] = []  # the eager path's logits rows, in its order
        cuts: list[tuple[int, int]] = []  # each request's rows among them
        offset = 0
        for sp in spans:
            n = sp.n_tokens
            picked = range(offset, offset + n) if sp.prompt_logits else [offset + n - 1]
            cuts.append((len(rows), len(rows) + len(picked)))
            rows += picked
            offset += n
        index = torch.tensor(rows, device=out.device)
        logits = out[index]  # a copy: the next replay of any bucket may reuse the graph's memory
        last = logits[torch.tensor([b - 1 for _, b in cuts], device=out.device)]
        prompt = {i: logits[a:b] for i, (a, b) in enumerate(cuts) if spans[i].prompt_logits}
        per_request: list[torch.Tensor | None] | None = None
        if speculative:  # every row uses the base heads (no adapters)
            spec = self.spec_out[bucket][index]
            per_request = [spec[a:b] for a, b in cuts]
        return VerifyLogits(last, prompt, per_request)


def capture_verify(
    model: FlashQwenForCausalLM, kv: KVCache, pctx: ParallelContext, cfg: EngineConfig, pool: Any = None
) -> GraphedVerify | None:
    """Verify-step graphs when the shard speculates (--speculative-tokens, or Medusa heads attached now), for
    S = Info.speculate drafts per row; None otherwise."""
    setting = Speculation(cfg.speculative_tokens, model.medusa_heads)
    if not setting.tokens:
        return None
    t0, free0 = time.time(), torch.cuda.mem_get_info(pctx.device)[0]
    max_blocks = math.ceil(cfg.max_seq_len / cfg.block_size)
    verify = GraphedVerify(model, kv, max_blocks, kv.num_blocks - 1, setting.tokens, pool=pool)
    log.info(
        "CUDA graphs: %d verify buckets (%d drafts per row%s) captured in %.1fs, %.0f MiB",
        len(verify.graphs),
        setting.tokens,
        f", with the {model.medusa_heads} Medusa heads' logits" if verify.heads is not None else "",
        time.time() - t0,
        (free0 - torch.cuda.mem_get_info(pctx.device)[0]) / 2**20,
    )
    return verify
