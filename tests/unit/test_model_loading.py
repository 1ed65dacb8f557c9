"""What from_pretrained reads before it builds the model (worker/models/loading.py): the activation dtype
follows the checkpoint's bf16/fp16/fp32 flag, except that a quantized checkpoint marked fp16 runs in bf16."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, write_checkpoint
from random_weights import random_checkpoint
from worker.models.loading import checkpoint_settings


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fp16"))
    return write_checkpoint(path, {**TINY, "fp16": True}, random_checkpoint(TINY, 0))


@pytest.mark.parametrize(
    "quantize,dtype,expected",
    [
        ("none", None, torch.float16),  # float: the checkpoint's dtype
        ("fp8", None, torch.bfloat16),  # quantized and marked fp16: bf16 activations
        ("fp8", torch.float32, torch.float32),  # an explicit dtype wins
    ],
)
def test_activation_dtype(fp16_dir, quantize, dtype, expected):
    config, got, quant = checkpoint_settings(fp16_dir, dtype, quantize)
    assert got == expected
    assert config.hidden_size == TINY["hidden_size"]
    assert (quant is None) == (quantize == "none")
