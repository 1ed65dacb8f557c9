"""Prompt lookup (n-gram) drafts: no extra weights, the request's own tokens propose the next ones.

The longest suffix of the sequence (n = 3, 2, 1 tokens) that occurred earlier proposes the tokens that followed
its latest earlier occurrence. An index of n-gram -> position after its latest occurrence is grown as tokens
are appended, so a step costs O(tokens appended), not a scan of the prompt.

A request whose drafts are mostly rejected pays for verify rows it does not use (open-ended chat), so the
lookup switches itself off per request: after each WINDOW steps that carried drafts, if fewer than MIN_RATE
of the window's drafts were accepted, that request drafts no more (logged once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_NGRAM = 3
WINDOW = 8  # drafted steps per acceptance check
MIN_RATE = 0.2  # accepted / proposed drafts over a window below which the lookup stops for the request


@dataclass
class PromptLookup:
    """One request's n-gram index and acceptance record."""

    follower: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> index after its latest occurrence
    indexed: int = 0  # tokens whose n-grams ending just before them are in `follower`
    steps: int = 0  # drafted steps in the current window
    proposed: int = 0  # drafts proposed in the current window
    accepted: int = 0  # of them accepted
    off: bool = False

    def propose(self, ids: list[int], n: int) -> list[int]:
        """Up to n tokens that followed the latest earlier occurrence of the longest matching suffix of `ids`."""
        if self.off or n <= 0 or len(ids) < 2:
            return []
        self._index(ids)
        for k in range(min(MAX_NGRAM, len(ids) - 1), 0, -1):
            j = self.follower.get(tuple(ids[-k:]))
            if j is not None:
                return ids[j : j + n]
        return []

    def _index(self, ids: list[int]) -> None:
        """Record, for each token at index p < len(ids) not yet indexed, the n-grams ending just before it."""
        for p in range(max(self.indexed, 1), len(ids)):
            for k in range(1, min(MAX_NGRAM, p) + 1):
                self.follower[tuple(ids[p - k : p])] = p
        self.indexed = max(self.indexed, len(ids))

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
