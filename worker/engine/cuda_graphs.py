"""CUDA graphs for decode: one graph per batch-size bucket, static input tensors, replay per step.

The decode forward (model + Triton attention with a fixed split count) makes no host syncs, so it
can be captured; inputs live in static buffers that each step overwrites before replay.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def capture(fn: Callable[[], torch.Tensor], pool: Optional[object] = None,
            warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture `fn` (reading only static tensors) into a graph; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 8 up to max_batch (as vLLM does, so padding stays small)."""
    sizes = [b for b in (1, 2, 4) if b <= max_batch]
    sizes += list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes
