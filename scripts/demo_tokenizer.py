"""A tiny byte-level BPE vocabulary for the demo model, in the `qwen.tiktoken` format.

Ranks 0..255 are the single bytes; each merge learned on the training text (NFC, split by the Qwen
pre-tokenisation pattern) gets the next rank. Training segments every pre-token exactly as tiktoken
does (`bpe_pieces`), so tiktoken's encoding of the training text is the trainer's final segmentation.
"""

from __future__ import annotations

import base64
import collections
import unicodedata

import regex

from worker.tokenizer import QWEN_PATTERN

Pair = tuple[bytes, bytes]


def bpe_pieces(ranks: dict[bytes, int], piece: bytes) -> list[bytes]:
    """tiktoken's BPE of one pre-token: the whole piece if it is a token, else merge the adjacent
    pair whose concatenation has the lowest rank (leftmost on ties) until none is a token."""
    if piece in ranks:
        return [piece]
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best, best_rank = -1, len(ranks)
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], len(ranks))
            if rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def bpe_encode(ranks: dict[bytes, int], text: str) -> list[int]:
    """Reference encoding of `text` (no special tokens): NFC, Qwen pre-tokens, `bpe_pieces`."""
    words = regex.findall(QWEN_PATTERN, unicodedata.normalize("NFC", text))
    return [ranks[p] for w in words for p in bpe_pieces(ranks, w.encode())]


def train_bpe_ranks(text: str, num_merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks learned greedily on `text`: up to `num_merges` merges of the most frequent
    adjacent pair within pre-tokens (ties: smallest (rank_a, rank_b)); stops early when no pair
    occurs twice. Deterministic."""
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    words = collections.Counter(w.encode() for w in regex.findall(QWEN_PATTERN, unicodedata.normalize("NFC", text)))
    segs = {w: bpe_pieces(ranks, w) for w in words}
    pairs: collections.Counter[Pair] = collections.Counter()
    for w, n in words.items():
        for pair in zip(segs[w], segs[w][1:]):
            pairs[pair] += n
    for _ in range(num_merges):
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], ranks[p[0]], ranks[p[1]]))
        if pairs[best] < 2:
            break
        token = best[0] + best[1]
        assert token not in ranks  # segments are tiktoken's fixed points: no adjacent pair is a token
        ranks[token] = len(ranks)
        for w, n in words.items():  # only words containing the new token can segment differently
            if token not in w:
                continue
            old, new = segs[w], bpe_pieces(ranks, w)
            for pair in zip(old, old[1:]):
                pairs[pair] -= n
                if pairs[pair] == 0:
                    del pairs[pair]
            for pair in zip(new, new[1:]):
                pairs[pair] += n
            segs[w] = new
    return ranks


def write_tiktoken_file(path: str, ranks: dict[bytes, int]) -> None:
    """Write `ranks` as `base64 rank` lines, sorted by rank (the `qwen.tiktoken` format)."""
    with open(path, "w", encoding="ascii") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
