"""Prompt lookup (n-gram) drafts: no extra weights, the request's own tokens propose the next ones.

The longest suffix of the sequence (n = 3, 2, 1 tokens) that occurred earlier proposes the tokens that followed
its latest earlier occurrence. The search is one vectorized pass over the request's tokens per step (kept in a
growing numpy buffer): microseconds for thousands of tokens, and nothing to build when a long prompt arrives.

A request whose drafts are mostly rejected pays for verify rows it does not use (open-ended chat), so the
lookup switches itself off per request: after each WINDOW steps that carried drafts, if fewer than MIN_RATE
of the window's drafts were accepted, that request drafts no more (logged once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

MAX_NGRAM = 3
WINDOW = 8  # drafted steps per acceptance check
MIN_RATE = 0.2  # accepted / proposed drafts over a window below which the lookup stops for the request


@dataclass
class PromptLookup:
    """One request's tokens (as searched) and acceptance record."""

    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # ids[:length], spare after
    length: int = 0
    steps: int = 0  # drafted steps in the current window
    proposed: int = 0  # drafts proposed in the current window
    accepted: int = 0  # of them accepted
    off: bool = False

    def propose(self, ids: list[int], n: int) -> list[int]:
        """Up to n tokens that followed the latest earlier occurrence of the longest matching suffix of `ids`."""
        if self.off or n <= 0 or len(ids) < 2:
            return []
        a = self._sync(ids)
        end = len(a) - 1
        ends = np.flatnonzero(a[:end] == a[end])  # earlier occurrences of the last token (each has a follower)
        if ends.size == 0:
            return []
        length = np.ones(ends.size, dtype=np.int64)  # each occurrence's n-gram match with the suffix, up to 3
        same = np.ones(ends.size, dtype=bool)
        for back in range(1, min(MAX_NGRAM, end)):
            same &= (ends >= back) & (a[np.maximum(ends - back, 0)] == a[end - back])
            length += same
        e = int(ends[ends.size - 1 - int(np.argmax(length[::-1]))])  # the longest match, latest among equals
        return a[e + 1 : e + 1 + n].tolist()

    def _sync(self, ids: list[int]) -> np.ndarray:
        """The buffer holding `ids` (a request's ids only grow: the new tail is appended)."""
        if len(ids) > self.tokens.size:
            grown = np.zeros(max(len(ids), 2 * self.tokens.size), dtype=np.int64)
            grown[: self.length] = self.tokens[: self.length]
            self.tokens = grown
        self.tokens[self.length : len(ids)] = ids[self.length :]
        self.length = len(ids)
        return self.tokens[: self.length]

    def record(self, request_id: int, proposed: int, accepted: int) -> None:
        """Count a verified step's drafts; switch off when a whole window's acceptance is below MIN_RATE."""
        if proposed <= 0 or self.off:
            return
        self.steps += 1
        self.proposed += proposed
        self.accepted += accepted
        if self.steps < WINDOW:
            return
        if self.accepted < MIN_RATE * self.proposed:
            self.off = True
            log.info(
                "request %d: prompt lookup off (%d of %d drafts accepted over %d steps, below %.0f%%)",
                request_id,
                self.accepted,
                self.proposed,
                self.steps,
                100 * MIN_RATE,
            )
        self.steps = self.proposed = self.accepted = 0
