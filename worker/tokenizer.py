"""Qwen v1 tokenizer: `qwen.tiktoken` through tiktoken (fallback: a byte-level HF `tokenizer.json`
through `tokenizers`), the checkpoint's eos ids, and an incremental detokenizer that never emits a
broken character.

Ids: the BPE ranks come first (rank == id), then the special tokens in `SPECIAL_TOKEN_NAMES` order
(<|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0|> .. <|extra_204|>); `n_real_vocab` is the first
id that is never valid (the model's padded `vocab_size` is larger). Text is NFC-normalised before
encoding, and special-token text in the input becomes the special ids (ChatML prompts rely on this).
Decoding works on bytes and uses "replace" for invalid UTF-8.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import Literal

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKEN_NAMES: list[str] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [
    f"<|extra_{i}|>" for i in range(205)
]

AllowedSpecial = Literal["all"] | AbstractSet[str]
EncodeFn = Callable[[str, AllowedSpecial], list[int]]


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: one `base64(token bytes) SPACE rank` per line, blank lines skipped."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                token_b64, rank_text = line.split()
                token, rank = base64.b64decode(token_b64, validate=True), int(rank_text)
            except (ValueError, binascii.Error) as exc:
                raise ValueError(f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}") from exc
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} already has rank {ranks[token]}")
            ranks[token] = rank
    return ranks


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_ids(value: object) -> set[int]:
    """`eos_token_id` is written as an int or a list of ints (or left out / null)."""
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}  # type: ignore


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class QwenTokenizer:
    """Encode/decode for Qwen v1. Build with `from_dir`.

    Attributes: `n_real_vocab` (ranks + specials: the first id that is never valid), `special_ids`,
    `first_special_id` (skip_special_tokens drops ids >= this), `endoftext_id`, `im_start_id`,
    `im_end_id`, `pad_id` (= endoftext, as Qwen does), `eos_token_ids` (ids that end generation).
    """

    def __init__(
        self,
        encode_fn: EncodeFn,
        token_bytes: list[bytes],
        special_tokens: dict[str, int],
        eos_token_ids: Iterable[int] = (),
    ):
        missing = [n for n in SPECIAL_TOKEN_NAMES[:3] if n not in special_tokens]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self._encode = encode_fn
        self._token_bytes = token_bytes  # id -> bytes; a special token's bytes are its text
        self.special_tokens = dict(special_tokens)
        self.n_real_vocab = len(token_bytes)
        self.special_ids = frozenset(special_tokens.values())
        self.first_special_id = min(self.special_ids)
        self.endoftext_id = special_tokens["<|endoftext|>"]
        self.im_start_id = special_tokens["<|im_start|>"]
        self.im_end_id = special_tokens["<|im_end|>"]
        self.pad_id = self.endoftext_id
        self.eos_token_ids = frozenset(eos_token_ids) | {self.endoftext_id}
        for i in self.eos_token_ids:
            self._check(i)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, model_dir: str) -> QwenTokenizer:
        """Load `qwen.tiktoken` (or else `tokenizer.json`) and the eos ids of a checkpoint directory."""
        tiktoken_path = os.path.join(model_dir, "qwen.tiktoken")
        json_path = os.path.join(model_dir, "tokenizer.json")
        if os.path.isfile(tiktoken_path):
            encode_fn, token_bytes, special = cls._load_tiktoken(tiktoken_path)
        elif os.path.isfile(json_path):
            encode_fn, token_bytes, special = cls._load_tokenizer_json(json_path)
        else:
            raise FileNotFoundError(f"{model_dir} has neither qwen.tiktoken nor tokenizer.json")
        return cls(encode_fn, token_bytes, special, cls._read_eos_ids(model_dir, special))

    @staticmethod
    def _read_eos_ids(model_dir: str, special: dict[str, int]) -> set[int]:
        """Union of config.json's and generation_config.json's `eos_token_id` and single-token
        `stop_words_ids`, plus <|endoftext|>; chat (ChatML) models also stop on <|im_end|> and
        <|im_start|>."""
        config = _read_json(os.path.join(model_dir, "config.json"))
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        ids = _as_ids(config.get("eos_token_id")) | _as_ids(gen.get("eos_token_id"))
        ids |= {int(s[0]) for s in gen.get("stop_words_ids") or [] if len(s) == 1}
        chat_ids = {special["<|im_start|>"], special["<|im_end|>"]}
        if gen.get("chat_format") == "chatml" or config.get("chat") or gen.get("chat") or ids & chat_ids:
            ids |= chat_ids
        return ids | {special["<|endoftext|>"]}

    @staticmethod
    def _load_tiktoken(path: str) -> tuple[EncodeFn, list[bytes], dict[str, int]]:
        import tiktoken

        ranks = load_tiktoken_ranks(path)
        token_bytes: list[bytes] = [b""] * len(ranks)
        for token, rank in ranks.items():
            if not 0 <= rank < len(ranks):
                raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1} (one per line), found {rank}")
            token_bytes[rank] = token
        special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
        token_bytes += [name.encode() for name in SPECIAL_TOKEN_NAMES]
        enc = tiktoken.Encoding(
            os.path.basename(path), pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special
        )

        def encode(text: str, allowed: AllowedSpecial) -> list[int]:
            return enc.encode(text, allowed_special=allowed, disallowed_special=())

        return encode, token_bytes, special

    @staticmethod
    def _load_tokenizer_json(path: str) -> tuple[EncodeFn, list[bytes], dict[str, int]]:
        """A byte-level BPE `tokenizer.json`: ids from its vocab and added tokens, bytes through the
        byte-level alphabet; encoding by `tokenizers`, with special tokens split out here."""
        from tokenizers import Tokenizer

        spec = _read_json(path)
        if '"ByteLevel"' not in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")]):
            raise ValueError(f"{path}: only byte-level BPE tokenizers are supported")
        tok = Tokenizer.from_file(path)
        tok.encode_special_tokens = True  # special-token text is matched below, as tiktoken does
        alphabet = _byte_level_alphabet()
        by_id: dict[int, bytes] = {i: bytes(alphabet[c] for c in piece) for piece, i in spec["model"]["vocab"].items()}
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        by_id.update({i: name.encode() for name, i in special.items()})
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"{path}: token ids must be 0..{len(by_id) - 1} without gaps")
        token_bytes = [by_id[i] for i in range(len(by_id))]

        def encode(text: str, allowed: AllowedSpecial) -> list[int]:
            names = sorted(special if allowed == "all" else allowed, key=len, reverse=True)
            ids: list[int] = []
            start = 0
            for m in re.finditer("|".join(map(re.escape, names)), text) if names else ():
                ids += tok.encode(text[start : m.start()], add_special_tokens=False).ids
                ids.append(special[m.group()])
                start = m.end()
            return ids + tok.encode(text[start:], add_special_tokens=False).ids

        return encode, token_bytes, special

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, allowed_special: AllowedSpecial = "all") -> list[int]:
        """Token ids of NFC(text). Special-token text named in `allowed_special` becomes its id;
        any other special-token text is encoded as ordinary text."""
        if allowed_special != "all":
            unknown = set(allowed_special) - self.special_tokens.keys()
            if unknown:
                raise ValueError(f"unknown special tokens {sorted(unknown)}")
        return self._encode(unicodedata.normalize("NFC", text), allowed_special)

    def _check(self, token_id: int) -> None:
        if not 0 <= token_id < self.n_real_vocab:
            raise ValueError(f"token id {token_id} is not a valid token (valid ids are 0..{self.n_real_vocab - 1})")

    def is_special(self, token_id: int) -> bool:
        self._check(token_id)
        return token_id in self.special_ids

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The bytes of `ids` joined (special tokens as their text, or dropped when skipping)."""
        out = []
        for i in ids:
            self._check(i)
            if not (skip_special_tokens and i >= self.first_special_id):
                out.append(self._token_bytes[i])
        return b"".join(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """Text of one token on its own (a partial UTF-8 character shows as U+FFFD)."""
        return self.decode([token_id])


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces without ever splitting a character.

    Bytes of an unfinished UTF-8 sequence wait for the next token; bytes that can never become valid
    are emitted as U+FFFD as soon as that is certain. The pieces of `add` followed by `flush` join to
    exactly `tokenizer.decode(ids, skip_special_tokens)`.
    """

    def __init__(self, tokenizer: QwenTokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text it completed (possibly "")."""
        piece = self._decoder.decode(self.tokenizer.decode_bytes([token_id], self.skip_special_tokens))
        self._text += piece
        return piece

    def flush(self) -> str:
        """End of stream: pending bytes of an unfinished character become U+FFFD."""
        piece = self._decoder.decode(b"", final=True)
        self._text += piece
        return piece

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text
