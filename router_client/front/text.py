"""Text helpers of the OpenAI routes and /tokenize: stop sequences cut out of streamed text, and
character offsets of tokens."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Protocol


class StopTrimmer:
    """OpenAI never returns the stop sequence. Streamed text that could still become one is held
    back until it cannot; once one appears, it and everything after it are dropped."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed generated text; returns what may be sent now."""
        if self.stopped:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
            return out
        keep = self._held_back()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        """At the end of generation: the text held back (it never became a stop sequence)."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out

    def _held_back(self) -> int:
        """Length of the longest tail of the pending text that starts some stop sequence."""
        for k in range(min(len(self._pending), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = self._pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


def trim_stop(text: str, stops: Sequence[str]) -> str:
    trimmer = StopTrimmer(stops)
    return trimmer.push(text) + trimmer.flush()


class ByteTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes: ...


def token_offsets(tokenizer: ByteTokenizer, text: str) -> tuple[str, list[int], list[tuple[int, int]]]:
    """NFC(text), its ids as a prompt is tokenized (special-token text becomes the special id), and
    each token's [start, stop) character offsets in NFC(text). A token that ends inside a character
    reaches to that character's end."""
    text = unicodedata.normalize("NFC", text)
    ids = tokenizer.encode(text)
    char_of_byte: list[int] = []
    for k, ch in enumerate(text):
        char_of_byte += [k] * len(ch.encode())
    char_of_byte.append(len(text))
    spans, at = [], 0
    for i in ids:
        n = len(tokenizer.decode_bytes([i]))
        start = char_of_byte[at]
        stop = char_of_byte[at + n - 1] + 1 if n else start
        spans.append((start, stop))
        at += n
    return text, ids, spans
