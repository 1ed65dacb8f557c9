"""Checkpoint plumbing around the model: what `from_pretrained` reads before building it (config,
quantization, activation dtype) and the per-layer progress bar while it loads."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

from worker.config import QwenConfig
from worker.quant.config import QuantConfig, choose
from worker.weights import torch_dtype

log = logging.getLogger(__name__)
T = TypeVar("T")


def checkpoint_settings(
    model_dir: str, dtype: torch.dtype | None, quantize: str
) -> tuple[QwenConfig, torch.dtype, QuantConfig | None]:
    """(config, activation dtype, quantization) of a checkpoint. quantize: --quantize (auto: GPTQ when
    the checkpoint has a quantization_config, else float); dtype None: the checkpoint's torch_dtype."""
    config = QwenConfig.from_pretrained(model_dir)
    quant = choose(model_dir, quantize)
    if dtype is None:
        dtype = torch_dtype(config.torch_dtype)
        if quant is not None and dtype == torch.float16:  # GPTQ releases say fp16 (for old CUDA kernels)
            log.info("quantized checkpoint marked fp16: bf16 activations (Qwen trained in bf16; fp16 can overflow)")
            dtype = torch.bfloat16
    log.info("weights: %s", quant.describe() if quant is not None else f"unquantized, {dtype}")
    return config, dtype, quant


def layer_progress(layers: Iterable[T], total: int, show: bool) -> Iterator[T]:
    """`layers`, with a progress bar when `show` (rank 0, asked for)."""
    from tqdm import tqdm

    return iter(tqdm(layers, total=total, desc="loading layers", disable=not show, unit="layer"))
