"""Per-request stop checks, in the contract's order: length, then eos, then stop sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class FinishReason(IntEnum):
    """Values of LoRAX's `generate.v1.FinishReason` proto enum."""

    FINISH_REASON_LENGTH = 0
    FINISH_REASON_EOS_TOKEN = 1
    FINISH_REASON_STOP_SEQUENCE = 2


@dataclass
class StoppingCriteria:
    max_new_tokens: int
    stop_sequences: list[str]
    ignore_eos_token: bool
    eos_ids: frozenset[int]
    _stops: tuple[str, ...] = field(init=False, repr=False)  # non-empty stop sequences
    _window: int = field(init=False, repr=False)  # longest stop sequence: the text tail worth checking

    def __post_init__(self) -> None:
        self.eos_ids = frozenset(self.eos_ids)
        self._stops = tuple(s for s in self.stop_sequences if s)  # "" would stop at once: ignored
        self._window = max((len(s) for s in self._stops), default=0)

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    def check(self, new_id: int, generated_text: str, n_generated: int) -> FinishReason | None:
        """After appending `new_id` (the n_generated-th new token; text decoded so far): why stop, or None."""
        if n_generated >= self.max_new_tokens:
            return FinishReason.FINISH_REASON_LENGTH
        if not self.ignore_eos_token and new_id in self.eos_ids:
            return FinishReason.FINISH_REASON_EOS_TOKEN
        if self._window:
            tail = generated_text[-self._window :]
            if any(tail.endswith(s) for s in self._stops):
                return FinishReason.FINISH_REASON_STOP_SEQUENCE
        return None
