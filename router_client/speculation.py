"""Speculative decoding as the router sees it (plain Python): the shards verify `Info.speculate` drafts
per step, so one Generation may carry 1..speculate+1 accepted tokens. The router budgets KV for the
drafts (blocks.py), turns each Generation into one token event per token (requests.py) and counts
accepted tokens per Decode row; this module logs that acceptance rate now and then."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from router_client.messages import RouterStats

log = logging.getLogger(__name__)


def count_decode_rows(stats: RouterStats, rows: Iterable[tuple[bool, int]]) -> None:
    """Add `(was_prefilled, n_tokens)` of each Generation of one step: rows of requests that had their
    first token before this step are Decode rows (a request's first token is never speculative)."""
    for prefilled, n in rows:
        if prefilled and n:
            stats.decode_rows += 1
            stats.decode_tokens += n


class AcceptanceLog:
    """Logs accepted tokens per Decode step every `interval_s` seconds while they change (0 or no
    speculation: never)."""

    def __init__(self, interval_s: float, speculate: int) -> None:
        self.interval_s = interval_s
        self.speculate = speculate
        self._next = time.monotonic() + interval_s
        self._seen = (0, 0)

    def maybe_log(self, stats: RouterStats, lock: Any) -> None:
        if self.interval_s <= 0 or not self.speculate or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval_s
        with lock:
            now = (stats.decode_rows, stats.decode_tokens)
            per_step = stats.accepted_per_step
        if now == self._seen:
            return
        rows, tokens = now[0] - self._seen[0], now[1] - self._seen[1]
        self._seen = now
        log.info(
            "speculative decoding (%d drafts per step): %.2f accepted tokens per decode step since start, "
            "%.2f over the last %d rows (%d tokens)",
            self.speculate,
            per_step,
            tokens / rows,
            rows,
            tokens,
        )
