"""Qwen v1 chat prompts: ChatML as Qwen's own `make_context` builds it, from token ids piece by piece.

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>user\\n{text}<|im_end|>
    \\n<|im_start|>assistant\\n{text}<|im_end|>  ...
    \\n<|im_start|>assistant\\n

Roles and message text are encoded with no special token allowed, so text such as "<|im_end|>"
inside a message stays ordinary text and can never close or open a turn. Generation stops on
`<|im_end|>` or `<|im_start|>` (checkpoints without a chat generation_config do not list them as eos).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

DEFAULT_SYSTEM = "You are a helpful assistant."
CHAT_STOPS = ("<|im_end|>", "<|im_start|>")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatTokenizer(Protocol):
    im_start_id: int
    im_end_id: int

    def encode(self, text: str, allowed_special: object = ...) -> list[int]: ...


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant
    text: str


def chatml_ids(tokenizer: ChatTokenizer, turns: Sequence[Turn], default_system: str = DEFAULT_SYSTEM) -> list[int]:
    """Prompt ids for `turns`, ending with an open assistant turn. A default system turn comes first
    unless the first turn is a system turn."""

    def text(s: str) -> list[int]:
        return tokenizer.encode(s, allowed_special=set())

    newline = text("\n")
    turns = list(turns)
    if not turns or turns[0].role != "system":
        turns.insert(0, Turn("system", default_system))
    ids: list[int] = []
    for k, turn in enumerate(turns):
        if turn.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {turn.role!r}")
        if k:
            ids += newline
        ids += [tokenizer.im_start_id, *text(turn.role), *newline, *text(turn.text), tokenizer.im_end_id]
    return ids + newline + [tokenizer.im_start_id, *text("assistant"), *newline]
