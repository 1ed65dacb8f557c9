"""A tiny byte-level BPE vocabulary for the demo model, in the `qwen.tiktoken` format.

Ranks 0..255 are the single bytes; each merge learned on the training text (split by the Qwen
pre-tokenisation pattern) gets the next rank, so tiktoken's rank-ordered merging reproduces it.
"""
from __future__ import annotations

import base64
import collections

import regex

from worker.tokenizer import QWEN_PATTERN


def train_bpe_ranks(text: str, num_merges: int) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    words = collections.Counter(regex.findall(QWEN_PATTERN, text))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for w, count in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], ranks[p[0]], ranks[p[1]]))
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        for w in words:
            s = seqs[w]
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == best[0] and s[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return ranks


def write_tiktoken_file(path: str, ranks: dict[bytes, int]) -> None:
    with open(path, "w") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
