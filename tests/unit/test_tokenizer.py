"""QwenTokenizer (tiktoken and tokenizer.json), eos ids, IncrementalDetokenizer, the demo BPE trainer.

The vocabulary is trained here with `train_bpe_ranks` on built-in text, so ranks 0..255 are the single
bytes: feeding those ids one by one splits any multi-byte character across tokens on purpose.
"""

from __future__ import annotations

import json
import os
import unicodedata

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from demo_tokenizer import bpe_encode, train_bpe_ranks, write_tiktoken_file
from worker.tokenizer import (
    QWEN_PATTERN,
    SPECIAL_TOKEN_NAMES,
    IncrementalDetokenizer,
    QwenTokenizer,
    _byte_level_alphabet,
    load_tiktoken_ranks,
)

TRAIN_TEXT = (
    """\
The quick brown fox jumps over the lazy dog. The dog didn't mind; it's used to foxes that'll jump.
Once upon a time, a small fox found a golden key by the river, and the river sang of old stone bridges.
Water boils at one hundred degrees at sea level; at 3000 metres it boils at about 90 degrees.
Grüße aus Zürich! Ünïcödé and naïve café crème brûlée, déjà vu, señor, façade, Ærø, Łódź.
日本語のテキストです。東京は日本の首都です。世界、こんにちは！中文也可以：你好，世界。
Привет, мир! Как дела? Всё хорошо. Ελληνικά: γειά σου κόσμε. עברית ועربية: مرحبا بالعالم.
Emoji: 😀😃😄 🚀🌍✨ 👍🏽 👨‍👩‍👧 — and symbols: ©®™ ±×÷ ∑∫√∞ ≤≥≠ €£¥ ½¾.
def add(a, b):\n    return a + b  # code, tabs\tand   spaces\r\n
"""
    * 3
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = st.one_of(
    st.text(),
    st.lists(st.sampled_from(list("ae é\u0301日本語😀👍🏽\u200d\n\r\t'sx1<|>") + SPECIALS)).map("".join),
)
settings.register_profile("tokenizer", deadline=None, max_examples=150)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return train_bpe_ranks(TRAIN_TEXT, num_merges=300)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, ranks) -> str:
    d = str(tmp_path_factory.mktemp("tok"))
    write_tiktoken_file(os.path.join(d, "qwen.tiktoken"), ranks)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir) -> QwenTokenizer:
    return QwenTokenizer.from_dir(tok_dir)


# ------------------------------------------------------------------ demo trainer
def test_trainer_is_deterministic_and_dense(ranks):
    assert train_bpe_ranks(TRAIN_TEXT, num_merges=300) == ranks
    assert sorted(ranks.values()) == list(range(len(ranks))) and 256 < len(ranks) <= 256 + 300
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert b" the" in ranks and "日本".encode() in ranks  # frequent pieces were learned


def test_trainer_stops_at_num_merges():
    assert len(train_bpe_ranks(TRAIN_TEXT, num_merges=7)) == 256 + 7


def test_tiktoken_encodes_training_text_as_trained(tok, ranks):
    ids = tok.encode(TRAIN_TEXT, allowed_special=set())
    assert ids == bpe_encode(ranks, TRAIN_TEXT)
    assert len(ids) < len(TRAIN_TEXT.encode()) / 2  # the merges are used


@settings(settings.get_profile("tokenizer"))
@given(TEXTS)
def test_tiktoken_matches_reference_bpe(tok, ranks, text):
    assert tok.encode(text, allowed_special=set()) == bpe_encode(ranks, text)


def test_reference_bpe_takes_whole_piece_shortcut_like_tiktoken():
    # "abcd" is a token, yet merging by rank gets stuck at [a, bc, d]: only the whole-piece lookup finds it
    ranks = {bytes([b]): b for b in range(256)} | {b"bc": 256, b"ab": 257, b"cd": 258, b"abcd": 259}
    enc = tiktoken.Encoding("t", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in ["abcd", "abcde", " abcd"]:
        assert bpe_encode(ranks, text) == enc.encode(text)
    assert bpe_encode(ranks, "abcd abcde") == [259, 32, 97, 256, 100, 101]


# ------------------------------------------------------------------ file parsing
def test_load_ranks_skips_blank_lines_and_names_bad_line(tmp_path):
    p = tmp_path / "v.tiktoken"
    p.write_text("YQ== 0\n\nYg== 1\n")
    assert load_tiktoken_ranks(str(p)) == {b"a": 0, b"b": 1}
    p.write_text("YQ== 0\nYg==1\n")
    with pytest.raises(ValueError, match=rf"{p}:2"):
        load_tiktoken_ranks(str(p))
    p.write_text("YQ== 0\n!!! 1\n")
    with pytest.raises(ValueError, match=rf"{p}:2"):
        load_tiktoken_ranks(str(p))


def test_ranks_with_gaps_are_rejected(tmp_path):
    write_tiktoken_file(str(tmp_path / "qwen.tiktoken"), {bytes([b]): b for b in range(256)} | {b"ab": 300})
    with pytest.raises(ValueError, match="ranks must be"):
        QwenTokenizer.from_dir(str(tmp_path))


def test_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither qwen.tiktoken nor tokenizer.json"):
        QwenTokenizer.from_dir(str(tmp_path))


# ------------------------------------------------------------------ encode / decode
@settings(settings.get_profile("tokenizer"))
@given(TEXTS)
def test_roundtrip_is_nfc(tok, text):
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_nfc_normalises_before_encoding(tok):
    assert tok.encode("e\u0301") == tok.encode("é")


def test_special_token_ids(tok, ranks):
    n = len(ranks)
    assert [tok.encode(s) for s in SPECIALS] == [[n], [n + 1], [n + 2]]
    assert tok.encode("<|extra_204|>") == [n + 207] and tok.special_tokens["<|extra_0|>"] == n + 3
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id, tok.pad_id) == (n, n + 1, n + 2, n)
    assert tok.n_real_vocab == n + 208 == n + len(SPECIAL_TOKEN_NAMES)
    assert tok.special_ids == frozenset(range(n, n + 208))
    assert tok.is_special(n + 2) and not tok.is_special(n - 1)


def test_chatml_prompt_and_skip_special_tokens(tok):
    prompt = "<|im_start|>user\nHello, 世界!<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids[0] == tok.im_start_id and ids.count(tok.im_end_id) == 1 and ids.count(tok.im_start_id) == 2
    assert tok.decode(ids) == prompt
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHello, 世界!\nassistant\n"
    assert tok.token_text(tok.im_end_id) == "<|im_end|>"


def test_disallowed_special_text_is_plain_text(tok):
    ids = tok.encode("<|im_end|>", allowed_special=set())
    assert tok.im_end_id not in ids and tok.decode(ids) == "<|im_end|>"
    ids = tok.encode("<|im_end|><|endoftext|>", allowed_special={"<|endoftext|>"})
    assert ids[-1] == tok.endoftext_id and tok.im_end_id not in ids
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_token_text_of_partial_character_is_replacement(tok):
    assert tok.token_text(0xF0) == "\ufffd" and tok.token_text(ord("a")) == "a"
    assert tok.decode_bytes([0xF0, 0x9F, 0x98, 0x80]) == "😀".encode()


@pytest.mark.parametrize("call", ["decode", "decode_bytes", "token_text", "is_special", "detok"])
def test_invalid_ids_raise(tok, call):
    bad = tok.n_real_vocab
    fn = {
        "decode": lambda: tok.decode([1, bad]),
        "decode_bytes": lambda: tok.decode_bytes([bad]),
        "token_text": lambda: tok.token_text(bad),
        "is_special": lambda: tok.is_special(-1),
        "detok": lambda: IncrementalDetokenizer(tok).add(bad + 5),
    }[call]
    with pytest.raises(ValueError, match=r"token id -?\d+ is not a valid token"):
        fn()


# ------------------------------------------------------------------ eos ids
@pytest.mark.parametrize(
    "config, gen, expected",
    [
        ({}, {}, {"eot"}),
        ({"eos_token_id": 5}, {}, {"eot", 5}),
        ({}, {"eos_token_id": [7, 8]}, {"eot", 7, 8}),
        ({"eos_token_id": [5]}, {"eos_token_id": 9}, {"eot", 5, 9}),
        ({}, {"eos_token_id": "eot", "chat_format": "chatml"}, {"eot", "im_end", "im_start"}),
        ({}, {"eos_token_id": ["eot", "im_end"]}, {"eot", "im_end", "im_start"}),
        ({}, {"chat_format": "raw", "stop_words_ids": [["eot"], [1, 2]]}, {"eot"}),
    ],
)
def test_eos_ids(tmp_path, ranks, config, gen, expected):
    n = len(ranks)
    names = {"eot": n, "im_start": n + 1, "im_end": n + 2}
    sub = lambda v: [sub(x) for x in v] if isinstance(v, list) else names.get(v, v)  # noqa: E731
    write_tiktoken_file(str(tmp_path / "qwen.tiktoken"), ranks)
    if config:
        _write_json(str(tmp_path / "config.json"), {k: sub(v) for k, v in config.items()})
    if gen:
        _write_json(str(tmp_path / "generation_config.json"), {k: sub(v) for k, v in gen.items()})
    assert QwenTokenizer.from_dir(str(tmp_path)).eos_token_ids == frozenset(sub(list(expected)))


def test_eos_id_outside_vocabulary_raises(tmp_path, ranks):
    write_tiktoken_file(str(tmp_path / "qwen.tiktoken"), ranks)
    _write_json(str(tmp_path / "config.json"), {"eos_token_id": len(ranks) + 208})
    with pytest.raises(ValueError, match="not a valid token"):
        QwenTokenizer.from_dir(str(tmp_path))


# ------------------------------------------------------------------ incremental detokenizer
def _stream(tok: QwenTokenizer, ids: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("char", ["é", "😀", "日"])
def test_character_split_across_tokens_waits_until_complete(tok, char):
    data = char.encode()
    pieces = _stream(tok, list(data) + [ord("!")], skip=False)  # single-byte ids == byte values
    assert pieces[: len(data) - 1] == [""] * (len(data) - 1)
    assert pieces[len(data) - 1 :] == [char, "!", ""]


def test_bytes_that_can_never_be_valid_become_replacement_once(tok):
    assert _stream(tok, [0xF0, 0x9F, ord("a")], skip=False) == ["", "", "\ufffda", ""]
    assert _stream(tok, [0xFF, 0xC3], skip=False) == ["\ufffd", "", "\ufffd"]  # 0xC3 pending until flush
    assert _stream(tok, [0xE6, tok.im_end_id], skip=False) == ["", "\ufffd<|im_end|>", ""]


@settings(settings.get_profile("tokenizer"))
@given(TEXTS, st.booleans())
def test_stream_of_encoded_text_matches_full_decode(tok, text, skip):
    ids = tok.encode(text)
    pieces = _stream(tok, ids, skip)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)  # never a broken character


@settings(settings.get_profile("tokenizer"))
@given(st.data(), st.booleans())
def test_stream_of_arbitrary_ids_matches_full_decode(tok, data, skip):
    ids = data.draw(st.lists(st.one_of(st.integers(0x80, 0xFF), st.integers(0, tok.n_real_vocab - 1)), max_size=40))
    assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


# ------------------------------------------------------------------ tokenizer.json fallback
def _write_tokenizer_json(path: str, ranks: dict[bytes, int]) -> None:
    """The same vocabulary as a HF byte-level BPE: merges are every split of a token into two tokens,
    ordered by the merged token's rank (tiktoken's priority); `ignore_merges` is tiktoken's
    whole-piece shortcut."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    byte_char = {b: c for c, b in _byte_level_alphabet().items()}
    text = {t: "".join(byte_char[b] for b in t) for t in ranks}
    splits = [(t[:i], t[i:]) for t in ranks for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks]
    splits.sort(key=lambda s: (ranks[s[0] + s[1]], ranks[s[0]], ranks[s[1]]))
    tk = Tokenizer(
        models.BPE(
            vocab={text[t]: r for t, r in ranks.items()},
            merges=[(text[a], text[b]) for a, b in splits],
            ignore_merges=True,
        )
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in SPECIAL_TOKEN_NAMES])
    tk.save(path)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, ranks) -> QwenTokenizer:
    d = tmp_path_factory.mktemp("hf")
    _write_tokenizer_json(str(d / "tokenizer.json"), ranks)
    return QwenTokenizer.from_dir(str(d))


def test_tokenizer_json_fallback_matches_tiktoken(hf_tok, tok):
    assert hf_tok.n_real_vocab == tok.n_real_vocab and hf_tok.special_tokens == tok.special_tokens
    assert hf_tok.eos_token_ids == tok.eos_token_ids
    prompt = "<|im_start|>user\n" + TRAIN_TEXT + "<|im_end|>\n"
    assert hf_tok.encode(prompt) == tok.encode(prompt)
    assert hf_tok.encode(prompt, allowed_special={"<|im_end|>"}) == tok.encode(prompt, allowed_special={"<|im_end|>"})
    assert all(hf_tok.decode_bytes([i]) == tok.decode_bytes([i]) for i in range(tok.n_real_vocab))


@settings(settings.get_profile("tokenizer"))
@given(TEXTS)
def test_tokenizer_json_roundtrip(hf_tok, text):
    assert hf_tok.decode(hf_tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_tokenizer_json_must_be_byte_level(tmp_path):
    _write_json(str(tmp_path / "tokenizer.json"), {"model": {"type": "WordPiece", "vocab": {}}, "decoder": None})
    with pytest.raises(ValueError, match="byte-level"):
        QwenTokenizer.from_dir(str(tmp_path))
