"""Medusa heads in a real shard: the demo's heads (scripts/make_demo_model.py) as the base speculator
(--speculative-adapter), bad per-request Medusa adapters refused through the router's DownloadAdapter /
LoadAdapter with the file and the reason, and the shard serving on: a valid per-request Medusa adapter
loads and generation stays the reference's greedy output (heads only draft; they never change it)."""

from __future__ import annotations

import os
import shutil

import grpc
import pytest
import torch

from make_demo_model import BASE_TEXTS, MEDUSA_HEADS
from medusa_helpers import medusa_tensors, write_medusa
from reference import ref_greedy
from shards import start_launcher, stop

PROMPT, CONTINUATION = BASE_TEXTS[0]


@pytest.fixture(scope="module")
def root(demo_dir, tmp_path_factory) -> str:
    """An adapter root with the demo's heads (`medusa`, and a copy `medusa2`) and bad ones beside them."""
    root = str(tmp_path_factory.mktemp("medusa_root"))
    for name in ("medusa", "medusa2"):
        shutil.copytree(os.path.join(demo_dir, "adapters", "medusa"), os.path.join(root, name))
    H, V = 64, _vocab(demo_dir)
    write_medusa(os.path.join(root, "v1"), medusa_tensors(H, V, MEDUSA_HEADS, 1, True, 0), MEDUSA_HEADS, 1)
    write_medusa(os.path.join(root, "k2"), medusa_tensors(H, V, 2, 1, False, 0), 2, 1)
    os.makedirs(os.path.join(root, "pickle"))
    torch.save({}, os.path.join(root, "pickle", "medusa_lm_head.bin"))
    shutil.copy(os.path.join(root, "medusa", "config.json"), os.path.join(root, "pickle"))
    return root


def _vocab(demo_dir: str) -> int:
    from worker.config import QwenConfig

    return QwenConfig.from_pretrained(os.path.join(demo_dir, "model")).vocab_size


@pytest.fixture(scope="module")
def shard(demo_dir, root):
    s = start_launcher(os.path.join(demo_dir, "model"), root, extra=("--speculative-adapter", "medusa"))
    yield s
    assert stop(s) == 0, s.log()[-3000:]


def test_the_speculator_is_loaded_and_logged(shard):
    assert f"speculator loaded: Medusa v2: {MEDUSA_HEADS} heads of 1 layers" in shard.log()


@pytest.mark.parametrize(
    "adapter_id, needle",
    [
        ("v1", "Medusa v1 heads (a vocab projection per head) can only be the base speculator"),
        ("k2", f"2 Medusa heads, but the loaded ones have {MEDUSA_HEADS}"),
        ("pickle", "medusa_lm_head.bin is a pickle"),
    ],
)
def test_bad_medusa_adapter_is_refused_and_serving_goes_on(router, ref_model, tok, root, adapter_id, needle):
    from router_client.client import ShardError

    with pytest.raises(ShardError) as err:
        router.load_adapter(adapter_id)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in str(err.value) and os.path.join(root, adapter_id) in str(err.value)
    state, cfg = ref_model
    expected = ref_greedy(state, cfg, tok.encode(PROMPT), 40, stop_ids=sorted(tok.eos_token_ids))
    result = router.generate(PROMPT, stopping=dict(max_new_tokens=40), timeout=60)
    assert result.text == CONTINUATION and result.token_ids == expected


def test_a_valid_medusa_adapter_loads_and_leaves_the_output_unchanged(router, ref_model, tok):
    index = router.load_adapter("medusa2")
    state, cfg = ref_model
    expected = ref_greedy(state, cfg, tok.encode(PROMPT), 40, stop_ids=sorted(tok.eos_token_ids))
    result = router.generate(PROMPT, stopping=dict(max_new_tokens=40), adapter_index=index, timeout=60)
    assert result.text == CONTINUATION and result.token_ids == expected
