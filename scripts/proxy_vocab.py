"""A proxy of Qwen's vocabulary for benchmarks: 151,643 byte tokens of made-up words, CJK runs, punctuation
and whitespace runs (Qwen's real qwen.tiktoken cannot be downloaded here). Mask costs of constrained decoding
and detokenization depend on the vocabulary's size and shape, not on the weights."""

from __future__ import annotations

import random

QWEN_BPE_TOKENS = 151643


def proxy_vocab(seed: int = 0) -> list[bytes]:
    """The tokens by rank: the 256 single bytes first, then distinct made-up tokens."""
    rng = random.Random(seed)
    lower, punct = "abcdefghijklmnopqrstuvwxyz", "{}[]():;,.\"'!?-_=+*/\\<>#"
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    while len(tokens) < QWEN_BPE_TOKENS:
        r = rng.random()
        if r < 0.55:
            word = "".join(rng.choice(lower) for _ in range(rng.randint(2, 10)))
            text = " " + (word.capitalize() if r < 0.15 else word)
        elif r < 0.7:
            text = "".join(rng.choice(lower) for _ in range(rng.randint(2, 8)))
        elif r < 0.85:
            text = "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 3)))
        elif r < 0.95:
            text = "".join(rng.choice(punct) for _ in range(rng.randint(1, 4)))
        else:
            text = "".join(rng.choice(" \n\t") for _ in range(rng.randint(2, 8)))
        if text.encode() not in seen:
            seen.add(text.encode())
            tokens.append(text.encode())
    return tokens
