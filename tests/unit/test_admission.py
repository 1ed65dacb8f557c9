"""Request admission (router_client/admission.py) at its boundaries: the KV pool's last usable block,
truncation keeping the prompt's tail, and the text a token-id prompt is sent with."""

from __future__ import annotations

import pytest

from router_client.admission import Admission
from router_client.blocks import BlockAllocator
from router_client.kv import KVBlocks
from router_client.messages import RouterConfig
from router_client.requests import ValidationError


class Digits:
    """One token per character: '0'..'9' -> 0..9."""

    def encode(self, text: str) -> list[int]:
        return [int(ch) for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(str(i) for i in ids)


def admission(speculate: int = 0, tokenizer: Digits | None = None) -> Admission:
    # 8 blocks of 4 tokens, block 0 reserved: 7 usable blocks, 28 KV tokens
    blocks = KVBlocks(BlockAllocator(8, 4), None)
    return Admission(RouterConfig(max_input_length=16, max_total_tokens=64), tokenizer, blocks, speculate)


def test_the_last_usable_block_fits_and_one_more_is_refused() -> None:
    # KV tokens = prompt + max_new_tokens - 1 + speculate; 28 fill the 7 usable blocks exactly
    fits = admission().check([1, 2, 3, 4], None, {"max_new_tokens": 25}, 0)
    assert (fits.n_tokens, fits.n_blocks) == (28, 7)
    with pytest.raises(ValidationError, match="needs 8 KV blocks .29 tokens. but the pool has only 7 usable"):
        admission().check([1, 2, 3, 4], None, {"max_new_tokens": 26}, 0)
    with pytest.raises(ValidationError, match="needs 8 KV blocks"):  # 2 drafts per step need 2 more slots
        admission(speculate=2).check([1, 2, 3, 4], None, {"max_new_tokens": 24}, 0)


def test_truncate_keeps_the_last_tokens_and_the_text_follows_the_ids() -> None:
    checked = admission(tokenizer=Digits()).check("0123456789", None, {"max_new_tokens": 1}, 4)
    assert checked.ids == [6, 7, 8, 9]
    assert admission(tokenizer=Digits()).check([3, 1, 4], None, None, 0).text == "314"
    assert admission().check([3, 1, 4], None, None, 0).text == ""  # no tokenizer to decode with
    with pytest.raises(ValidationError, match="needs a tokenizer"):
        admission().check("314", None, None, 0)
