"""Decode look-ahead: after a step, start the surviving batch's next decode forward before replying.

The reply, the router's turn and the next Decode then travel while the device works. Only the forward
runs early: sampling waits for the Decode that uses the logits (seeded streams stay as they were), and a
request's row serves only while its tokens are unchanged. Rows that a filter or concatenate leaves out go
with their requests; requests without a row are computed by the Decode. The K/V written are the ones that
step would write. Every rank takes the same decisions from the same state, so collectives stay in step.

Two variants: `start` runs after the step's tokens are appended and its stop checks are done; `prepare_fed`
(EngineConfig.look_ahead_fed) launches right after the sampler, the chosen ids fed to the forward on the device,
so that the device does not wait for the host to read them, check the stops and fill the inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from worker.engine.batch import Adapters, Ahead, Batch, RequestState
from worker.engine.chunks import RowSpan
from worker.engine.cuda_graphs import slot_at
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


def describe(wanted: bool | None, graphs_available: bool, world_size: int, fed: bool = False) -> str:
    """The setting as the start-up log states it; where it can run, which variant (fed: `prepare_fed`)."""
    if wanted is not None:
        setting = "on" if wanted else "off"
    elif not graphs_available:
        setting = "off (no CUDA graphs)"
    else:
        setting = (
            "off (TP: set --look-ahead on to use it)" if world_size > 1 else "on where CUDA graphs serve the batch"
        )
    if setting.startswith("off"):
        return setting
    return setting + (", fed (--look-ahead-fed)" if fed else ", after the stop checks (--look-ahead-fed off)")


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
    # rows stacked, not gathered by an index tensor: its copy to the device would wait for the running forward
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
        _failed(batch, exc, world_size)
        return
    attach(reqs, logits)


def _failed(batch: Batch, exc: Exception, world_size: int) -> None:
    log.warning(
        "decode look-ahead of batch %d failed (%r): its next Decode runs the forward itself%s",
        batch.id,
        exc,
        "; under TP the ranks' collectives may now be out of step" if world_size > 1 else "",
    )


Feed = Callable[[torch.Tensor], bool]


def prepare_fed(
    runner: Runner, batch: Batch, adapters: Adapters | None, *, wanted: bool | None, world_size: int
) -> Feed | None:
    """The look-ahead fed on the device (EngineConfig.look_ahead_fed), for a plain decode step whose tokens are
    being chosen: when `decide` says so, the next forward's inputs but the tokens are filled now, before the
    sampler runs; the returned feed takes the chosen ids [B] on the device, launches the forward (no host sync
    before it) and gives each request its row, valid once the token is appended. A request that stops at this
    token has its row computed and dropped with it: the K/V it writes go to its own slot at that position or
    to the scratch block (slot_at), and whatever later reuses its blocks runs after it on the same stream. A
    failure costs only the look-ahead (feed returns False)."""
    reqs = batch.requests
    graphs = runner.graphs
    decision = decide(
        wanted=wanted,
        graphs_available=graphs is not None,
        graphs_can_run=graphs is not None and graphs.can_run(batch, ahead=True),
        world_size=world_size,
        slots_allocated=True,  # slot_at gives the rows past their slots (they stop at this token) one
        prefilling=any(r.prefilling for r in reqs),
    )
    if not decision.run:
        return None
    try:
        slots = adapters.request_slots(batch) if adapters is not None else None
        launch = _prepare(runner, batch, slots)
    except Exception as exc:
        _failed(batch, exc, world_size)
        return None

    def feed(ids: torch.Tensor) -> bool:
        try:
            logits = launch(ids).clone()  # a graph's output buffer is reused
        except Exception as exc:
            _failed(batch, exc, world_size)
            return False
        for i, r in enumerate(reqs):
            r.ahead = Ahead(logits, i, len(r.ids) + 1)
        return True

    return feed


def _prepare(runner: Runner, batch: Batch, slots: list[int] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fed forward's launch: a CUDA graph's where one serves the batch, else (eager: CPU, tests) the
    runner's forward of the requests with their next token appended, read from the device then."""
    graphs = runner.graphs
    if graphs is not None and graphs.can_run(batch, ahead=True) and (slots is None or graphs.has_lora):
        return graphs.prepare_ahead(batch, slots)
    assert runner.kv is not None
    scratch, size = runner.kv.num_blocks - 1, runner.kv.block_size

    def launch(ids: torch.Tensor) -> torch.Tensor:
        reqs = [_appended(r, t, scratch, size) for r, t in zip(batch.requests, ids.tolist())]
        return runner.forward(Batch(batch.id, reqs, batch.sampler), False, slots).last

    return launch


def _appended(r: RequestState, token: int, scratch: int, size: int) -> RequestState:
    """A copy of r with `token` appended, a slot for it (slot_at) and a block there (the scratch block past its own)."""
    pos = len(r.ids)
    blocks = r.blocks + [scratch] * max(0, pos // size + 1 - len(r.blocks))
    slots = r.slots[:pos] + [slot_at(r.slots, r.blocks, pos, scratch, size)]
    return dataclasses.replace(r, ids=[*r.ids, token], slots=slots, blocks=blocks, ahead=None)


def settle(requests: Sequence[RequestState]) -> None:
    """After the step's tokens are appended: a request with a valid fed look-ahead row has its last token's K/V
    in the cache (as after `start`)."""
    for r in requests:
        if r.ahead is not None and r.ahead.length == len(r.ids):
            r.n_cached = len(r.ids)


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
