"""Qwen v1 tokenizer: `qwen.tiktoken` through tiktoken (fallback: a HF `tokenizer.json`), an
incremental detokenizer that never emits broken UTF-8, and the eos ids of the checkpoint.

Special tokens are numbered right after the BPE ranks: <|endoftext|>, <|im_start|>, <|im_end|>,
<|extra_0|> .. <|extra_204|>. Text is NFC-normalised before encoding; special-token text found in
the input becomes the special ids (ChatML prompts sent as text rely on this).
"""
from __future__ import annotations

import base64
import codecs
import json
import os
import unicodedata
from typing import Iterable, Optional, Sequence

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIAL_TOKEN_NAMES = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: expected 'base64 rank', got {line[:60]!r}") from exc
    return ranks


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _ids(value: object) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value}
    return {int(value)}  # type: ignore[arg-type]


class QwenTokenizer:
    def __init__(self, encode_fn, token_bytes: Sequence[bytes], special: dict[str, int], eos_ids: Iterable[int]):
        self._encode = encode_fn
        self._bytes = list(token_bytes)  # id -> bytes (special tokens: their text)
        self.special_tokens = dict(special)
        self.first_special = min(special.values())
        self.n_real_vocab = len(self._bytes)
        self.special_ids = frozenset(special.values())
        self.endoftext_id = special["<|endoftext|>"]
        self.im_start_id = special["<|im_start|>"]
        self.im_end_id = special["<|im_end|>"]
        self.pad_id = self.endoftext_id
        self.eos_token_ids = frozenset(eos_ids) | {self.endoftext_id}

    @classmethod
    def from_dir(cls, model_dir: str) -> "QwenTokenizer":
        config = _read_json(os.path.join(model_dir, "config.json"))
        gen = _read_json(os.path.join(model_dir, "generation_config.json"))
        eos = _ids(config.get("eos_token_id")) | _ids(gen.get("eos_token_id"))
        tiktoken_path = os.path.join(model_dir, "qwen.tiktoken")
        if os.path.isfile(tiktoken_path):
            return cls._from_tiktoken(tiktoken_path, eos, chat=bool(gen.get("chat_format") == "chatml"))
        json_path = os.path.join(model_dir, "tokenizer.json")
        if os.path.isfile(json_path):
            return cls._from_tokenizer_json(json_path, eos)
        raise FileNotFoundError(f"no qwen.tiktoken or tokenizer.json in {model_dir}")

    @classmethod
    def _from_tiktoken(cls, path: str, eos: set[int], chat: bool) -> "QwenTokenizer":
        import tiktoken

        ranks = load_tiktoken_ranks(path)
        n = len(ranks)
        special = {name: n + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
        enc = tiktoken.Encoding(os.path.basename(path), pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                special_tokens=special)
        token_bytes: list[bytes] = [b""] * (n + len(special))
        for tok, rank in ranks.items():
            token_bytes[rank] = tok
        for name, i in special.items():
            token_bytes[i] = name.encode()
        if chat:  # ChatML models also stop on <|im_end|> and <|im_start|>
            eos |= {special["<|im_end|>"], special["<|im_start|>"]}
        return cls(lambda text: enc.encode(text, allowed_special="all"), token_bytes, special, eos)

    @classmethod
    def _from_tokenizer_json(cls, path: str, eos: set[int]) -> "QwenTokenizer":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(path)
        vocab = tok.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        special = {name: vocab[name] for name in SPECIAL_TOKEN_NAMES if name in vocab}
        if "<|endoftext|>" not in special:
            raise ValueError(f"{path} has no <|endoftext|> token")
        token_bytes = [b""] * size
        for i in range(size):
            piece = tok.decode([i], skip_special_tokens=False)
            token_bytes[i] = piece.encode()
        # byte-level pieces: decode per id loses partial UTF-8; keep what decode gives (fallback only)
        return cls(lambda text: tok.encode(text, add_special_tokens=False).ids, token_bytes,
                   {**{n: special.get(n, -1) for n in SPECIAL_TOKEN_NAMES[:3]}, **special}, eos)

    # -------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        return list(self._encode(unicodedata.normalize("NFC", text)))

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n_real_vocab:
            raise ValueError(f"token id {i} is not a valid token (vocabulary of {self.n_real_vocab})")

    def is_special(self, i: int) -> bool:
        return i in self.special_ids

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        out = []
        for i in ids:
            self._check(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            out.append(self._bytes[i])
        return b"".join(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_text(self, i: int) -> str:
        return self.decode([i])


class IncrementalDetokenizer:
    """Feeds token ids, returns the text completed by each one. Bytes of an unfinished UTF-8
    character wait for the next token; bytes that can never be valid become U+FFFD."""

    def __init__(self, tokenizer: QwenTokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    def add(self, token_id: int) -> str:
        data = self.tokenizer.decode_bytes([token_id], self.skip_special_tokens)
        piece = self._decoder.decode(data)
        self._parts.append(piece)
        return piece

    def flush(self) -> str:
        piece = self._decoder.decode(b"", final=True)
        self._parts.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def pending(self) -> bool:
        return bool(self._decoder.getstate()[0])


def chat_prompt(messages: Sequence[dict], system: Optional[str] = "You are a helpful assistant.") -> str:
    """ChatML text for a list of {role, content} messages, ending with the assistant's turn."""
    parts = []
    if system is not None and not any(m["role"] == "system" for m in messages):
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)
