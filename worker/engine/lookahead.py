"""Decode look-ahead: after a step, start the surviving batch's next decode forward before replying.

The reply, the router's turn and the next Decode then travel while the device works. Only the forward
runs early: sampling waits for the Decode that uses the logits (seeded streams stay as they were), and a
request's row serves only while its tokens are unchanged. Rows that a filter or concatenate leaves out go
with their requests; requests without a row are computed by the Decode. The K/V written are the ones that
step would write. Every rank takes the same decisions from the same state, so collectives stay in step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.engine.batch import Adapters, Ahead, Batch
from worker.engine.chunks import RowSpan
from worker.engine.runner import Runner, StepLogits

log = logging.getLogger(__name__)


class HasAhead(Protocol):
    ids: list[int]
    ahead: Ahead | None


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str


def decide(
    *,
    wanted: bool | None,
    graphs_available: bool,
    graphs_can_run: bool,
    world_size: int,
    slots_allocated: bool,
    prefilling: bool = False,
) -> Decision:
    """Whether to look ahead for a batch. wanted None (auto) runs it only where CUDA graphs serve the batch
    and at TP=1: under TP a look-ahead that fails on one rank alone (e.g. out of memory) would leave the
    ranks' collectives out of step. It never runs before the next position's KV slot is allocated, nor for a
    batch with requests still prefilling (their next forward is a chunk, not a decode)."""
    if wanted is False:
        return Decision(False, "off")
    if prefilling:
        return Decision(False, "requests still prefilling")
    if wanted is None:
        if not graphs_available:
            return Decision(False, "auto: no CUDA graphs")
        if not graphs_can_run:
            return Decision(False, "auto: the CUDA graphs do not serve this batch")
        if world_size > 1:
            return Decision(False, "auto: off under TP")
    if not slots_allocated:
        return Decision(False, "the next position's KV slot is not allocated")
    return Decision(True, "on" if wanted else "auto: CUDA graphs at TP=1")


def describe(wanted: bool | None, graphs_available: bool, world_size: int) -> str:
    """The setting as the start-up log states it."""
    if wanted is not None:
        return "on" if wanted else "off"
    if not graphs_available:
        return "off (no CUDA graphs)"
    return "off (TP: set --look-ahead on to use it)" if world_size > 1 else "on where CUDA graphs serve the batch"


def attach(requests: Sequence[HasAhead], logits: torch.Tensor) -> None:
    """Give request i row i of a look-ahead's logits [n, V]."""
    for i, r in enumerate(requests):
        r.ahead = Ahead(logits, i, len(r.ids))


def clear(requests: Sequence[HasAhead]) -> None:
    for r in requests:
        r.ahead = None


def ready(requests: Sequence[HasAhead], prefill: bool) -> list[bool]:
    """Per request: does a look-ahead row computed for its current tokens serve this step?"""
    return [not prefill and r.ahead is not None and r.ahead.length == len(r.ids) for r in requests]


def take_rows(requests: Sequence[HasAhead], is_ready: Sequence[bool], computed: torch.Tensor | None) -> torch.Tensor:
    """This step's logits [B, V]: ready requests' look-ahead rows, the others' rows of `computed`
    ([missing, V], in order). Every request's row is used once: all are cleared. All rows of one
    look-ahead, in its order, return its tensor as is (no copy)."""
    first = requests[0].ahead
    whole = (
        all(is_ready)
        and first is not None
        and first.logits.shape[0] == len(requests)
        and all(
            r.ahead is not None and r.ahead.logits is first.logits and r.ahead.row == i for i, r in enumerate(requests)
        )
    )
    if whole and first is not None:  # the usual decode step: no per-row slices
        clear(requests)
        return first.logits
    rows: list[torch.Tensor] = []
    j = 0
    for r, ok in zip(requests, is_ready):
        if ok:
            assert r.ahead is not None
            rows.append(r.ahead.logits[r.ahead.row])
        else:
            assert computed is not None
            rows.append(computed[j])
            j += 1
    clear(requests)
    return torch.stack(rows)


def start(runner: Runner, batch: Batch, adapters: Adapters | None, *, wanted: bool | None, world_size: int) -> None:
    """Start the batch's next decode forward now, when `decide` says so. A failure only costs the look-ahead:
    the next Decode runs its own forward."""
    reqs = batch.requests
    clear(reqs)
    graphs = runner.graphs
    decision = decide(
        wanted=wanted,
        graphs_available=graphs is not None,
        graphs_can_run=graphs is not None and graphs.can_run(batch),
        world_size=world_size,
        slots_allocated=all(len(r.slots) >= len(r.ids) for r in reqs),
        prefilling=any(r.prefilling for r in reqs),
    )
    if not decision.run:
        return
    try:
        slots = adapters.request_slots(batch) if adapters is not None else None
        logits = runner.forward(batch, False, slots).last.clone()  # a graph's output buffer is reused
    except Exception as exc:
        log.warning(
            "decode look-ahead of batch %d failed (%r): its next Decode runs the forward itself%s",
            batch.id,
            exc,
            "; under TP the ranks' collectives may now be out of step" if world_size > 1 else "",
        )
        return
    attach(reqs, logits)


def step_logits(
    runner: Runner,
    batch: Batch,
    prefill: bool,
    adapter_slots: list[int] | None,
    spans: Sequence[RowSpan] | None = None,
    speculative: bool = False,
) -> StepLogits:
    """This step's logits: a decode takes each request's look-ahead row when it was computed for the
    request's current tokens, and runs the forward for the other requests only. A prefill (chunks or verify
    rows, maybe mixed with decode rows) computes `spans` and uses no look-ahead row, nor does a step that
    needs the Medusa heads' logits (`speculative`: a look-ahead computed none)."""
    reqs = batch.requests
    is_ready = ready(reqs, prefill or speculative)
    if not any(is_ready):
        clear(reqs)
        if speculative:
            return runner.forward(batch, prefill, adapter_slots, spans, speculative=True)
        return runner.forward(batch, prefill, adapter_slots, spans)
    missing = [i for i, ok in enumerate(is_ready) if not ok]
    computed = None
    if missing:
        sub = Batch(batch.id, [reqs[i] for i in missing], batch.sampler)
        sub_slots = None if adapter_slots is None else [adapter_slots[i] for i in missing]
        computed = runner.forward(sub, False, sub_slots).last
    return StepLogits(last=take_rows(reqs, is_ready, computed), prompt={})
