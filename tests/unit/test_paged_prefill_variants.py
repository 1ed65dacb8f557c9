"""The paged prefill kernel's variants (next-tile block-table prefetch, paged-only tile shapes) against the
torch backend on awkward batches: cache lengths off the block and tile grid, one-token rows, many
sequences, and the empty rows a graphed span step pads with (engine/graphed_spans.py)."""

from __future__ import annotations

import os
import sys

import pytest

if "worker.kernels.triton_attention" not in sys.modules:  # the kernels bind to the interpreter when defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from test_triton_kernels import Batch, close  # noqa: E402

from worker.kernels.triton_attention import Tiles  # noqa: E402
from worker.layers.attention import TorchAttention  # noqa: E402
from worker.layers.attention_triton import TritonAttention  # noqa: E402

VARIANTS = {
    "prefetch": Tiles(prefill_m=16, prefill_n=16, prefill_prefetch=True),
    "prefetch_key_tile_below_block": Tiles(prefill_m=16, prefill_n=4, prefill_prefetch=True),
    "paged_tiles": Tiles(prefill_m=64, prefill_n=64, prefill_paged_m=16, prefill_paged_n=32, prefill_prefetch=True),
}
CASES = {  # new tokens, cached tokens (block 8)
    "off_grid_caches": ([7, 16, 33], [13, 48, 101]),
    "one_token_rows": ([1, 1, 1, 5, 1], [0, 9, 64, 17, 130]),
    "many_sequences": ([3, 1, 9, 2, 17, 4, 1, 6, 11, 2, 1, 5], [5, 0, 40, 31, 2, 77, 8, 16, 1, 63, 120, 15]),
    "padded_graph_step": ([12, 0, 0, 20], [37, 0, 0, 0]),  # two empty rows, then the pad row
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_variant_matches_torch(case, variant, dtype):
    new, cached = CASES[case]
    b = Batch(new, cached, dtype, seed=len(case) + len(variant))
    out = b.attend(TritonAttention(tiles=VARIANTS[variant], use_varlen_attn=False))
    close(out, b.attend(TorchAttention()), dtype)


def test_paged_tile_fields_apply_only_over_a_cache():
    t = Tiles(prefill_paged_m=64, prefill_paged_n=32, prefill_paged_warps=4, prefill_paged_stages=2)
    assert t.prefill(torch.bfloat16) == (128, 128, 8, 3)
    assert t.prefill(torch.bfloat16, paged=True) == (64, 32, 4, 2)
    assert Tiles().prefill(torch.bfloat16, True, paged=True) == (128, 128, 8, 2)  # unset: the shared fields
    assert Tiles.parse("prefill_prefetch=1,prefill_paged_n=64") == Tiles(prefill_prefetch=True, prefill_paged_n=64)
    with pytest.raises(ValueError, match="prefill_paged_n"):
        Tiles(prefill_paged_n=48)
