"""fp8 KV-cache scales of the attention layers: the checkpoint's per-layer `k_scale`/`v_scale`, and the
keywords that hand a layer's live scales to the attention backend."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from worker.weights import Weights

log = logging.getLogger(__name__)

KVScales = tuple[torch.Tensor, torch.Tensor]  # one layer's (k_scale, v_scale): 0-d fp32 views into the cache's
CheckpointScales = tuple[float, float]  # one layer's (k_scale, v_scale) as the checkpoint stores them


def read_checkpoint_scales(weights: Weights, prefix: str) -> CheckpointScales | None:
    """`{prefix}.k_scale` and `{prefix}.v_scale`, or None unless the checkpoint has both."""
    names = (f"{prefix}.k_scale", f"{prefix}.v_scale")
    if not all(n in weights for n in names):
        return None
    return weights.scalar(names[0]), weights.scalar(names[1])


def every_layer(found: Sequence[CheckpointScales | None]) -> tuple[list[float], list[float]] | None:
    """Per-layer (k_scales, v_scales), or None unless every layer has both (a partial set is ignored)."""
    complete = [f for f in found if f is not None]
    if len(complete) < len(found):
        if complete:
            log.warning("the checkpoint has k_scale/v_scale for only some layers: ignoring them")
        return None
    return [f[0] for f in complete], [f[1] for f in complete]


def backend_kwargs(scales: KVScales | None) -> dict[str, torch.Tensor]:
    """The `k_scale`/`v_scale` keywords of AttentionBackend.store/attend; none for an unscaled cache."""
    return {} if scales is None else {"k_scale": scales[0], "v_scale": scales[1]}
