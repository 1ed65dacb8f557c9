"""`ServingLoop`: the router's background thread. Each step: load back the adapter the queue's head
needs, admit waiting requests (scheduler.py), run one step, then FilterBatch / ClearCache away
whatever finished or was cancelled. Commands (health probe, adapter loads) run between steps, so
every shard sees one call order.

A step without chunked prefill: Prefill the new batch alone, then Decode the running batch together
with the new one (the shards merge them keeping the running id). With chunked prefill (the shards
say Info.chunked_prefill and the config allows it): one forward per step, `Prefill(new,
cached_batch=running)` when requests were admitted, else `Decode([running])`; the running batch's
decode rows and unfinished chunks advance in every step, and admission spends what
`current_tokens` leaves of the budget. A request's prompt blocks join the prefix cache when its
first token arrives (its prefill is complete).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from router_client.adapters import AdapterScheduler
from router_client.client import ShardedClient, ShardError
from router_client.kv import PrefixLog
from router_client.messages import HEALTH_ID, RouterConfig, RouterStats, StepRecord, Tokenizer, health_batch
from router_client.requests import CANCELLED, Pending
from router_client.scheduler import Scheduler
from router_client.speculation import AcceptanceLog, count_decode_rows
from worker.pb import generate_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")
REFUSALS = ("INVALID_ARGUMENT", "FAILED_PRECONDITION")  # a shard refused a request; it is still serving


@dataclass
class _Command:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


class ServingLoop:
    """Drives the shards from one thread. `stats` and `running` are read under `cv`;
    `step_observer`, if set, is called on the loop thread after every Prefill and Decode."""

    def __init__(
        self,
        client: ShardedClient,
        scheduler: Scheduler,
        adapters: AdapterScheduler,
        config: RouterConfig,
        tokenizer: Tokenizer | None,
        cv: threading.Condition,
        chunking: bool = False,
        speculate: int = 0,
    ) -> None:
        self.client = client
        self.scheduler = scheduler
        self.adapters = adapters
        self.config = config
        self.tokenizer = tokenizer
        self.cv = cv
        self.stats = RouterStats()
        self.running: pb.CachedBatch | None = None
        self.step_observer: Callable[[StepRecord], None] | None = None
        self.stopping = False
        self.chunking = chunking
        self._prefix_log = PrefixLog(config.prefix_log_interval_s)
        self._acceptance_log = AcceptanceLog(config.prefix_log_interval_s, speculate)
        self._commands: list[_Command] = []
        self._next_batch_id = 0
        self._thread = threading.Thread(target=self._loop, name="qwen-router-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop: waiting and running requests fail, their batches are dropped."""
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop thread between steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        cmd = _Command(fn)
        with self.cv:
            if self.stopping or not self._thread.is_alive():
                raise RuntimeError("the router is not running")
            self._commands.append(cmd)
            self.cv.notify_all()
        return cmd.future.result()

    def health_probe(self) -> bool:
        return self.run(self._health_probe)

    def _loop(self) -> None:
        sched = self.scheduler
        try:
            while True:
                with self.cv:
                    while not (self.stopping or self._commands or sched.queue or self.running is not None):
                        self.cv.wait()
                    if self.stopping:
                        break
                    commands, self._commands = self._commands, []
                for cmd in commands:
                    try:
                        cmd.future.set_result(cmd.fn())
                    except BaseException as err:  # handed to the caller
                        cmd.future.set_exception(err)
                try:
                    self._step()
                except Exception as err:  # a router bug: fail what is in flight, keep serving
                    log.exception("router step failed")
                    batch_ids = [self.running.id] if self.running is not None else []
                    self.running = None
                    self._fail(batch_ids, list(sched.in_flight), f"router error: {err!r}")
        finally:  # also when the loop itself broke: no handle is left waiting forever
            with self.cv:
                self.stopping = True
            self._shutdown()

    def _step(self) -> None:
        sched, c = self.scheduler, self.config
        head = sched.head_adapter()
        if head:
            self.adapters.reload(head, sched.busy_adapters())
        self._prefix_log.maybe_log(sched.blocks, sched.cv)
        self._acceptance_log.maybe_log(self.stats, self.cv)
        if not self.chunking:
            admitted = sched.admit(c.max_batch_size, c.max_batch_prefill_tokens, self.adapters.ready)
            new_batches = self._prefill(admitted) if admitted else []
            batches = [b for b in (self.running, *new_batches) if b is not None]
            self.running = self._decode(batches) if batches else None
            return
        running = self.running
        busy = max(running.current_tokens, running.size) if running is not None else 0
        admitted = sched.admit(c.max_batch_size, c.max_batch_prefill_tokens - busy, self.adapters.ready, chunking=True)
        if admitted:
            self.running = next(iter(self._prefill(admitted, running)), None)
        elif running is not None:
            self.running = self._decode([running])

    def _prefill(self, entries: list[Pending], cached: pb.CachedBatch | None = None) -> list[pb.CachedBatch]:
        """Prefill `entries` as a new batch (chunked mode: in one forward with `cached`, the running
        batch). Returns the batch left to run, if any; on failure see `_prefill_failed`."""
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        batch = pb.Batch(
            id=batch_id,
            requests=[p.request for p in entries],
            size=len(entries),
            max_tokens=sum(p.n_tokens for p in entries),
            max_blocks=sum(len(p.blocks) for p in entries),
        )
        ids = [*(cached.request_ids if cached is not None else ()), *(p.id for p in entries)]
        start = time.perf_counter()
        try:
            generations, out = self.client.prefill(batch, cached)
        except ShardError as err:
            return self._prefill_failed(err, batch_id, entries, cached)
        self._observe("prefill", start, len(ids))
        self.stats.prefills += 1
        out = self._after_step(generations, out, ids)
        return [out] if out is not None else []

    def _prefill_failed(
        self, err: ShardError, batch_id: int, entries: list[Pending], cached: pb.CachedBatch | None
    ) -> list[pb.CachedBatch]:
        """A refused Prefill of several requests is retried one request at a time, so only the refused
        one fails. The shards validate a new batch before touching any state and a failed merged
        forward leaves the cached batch as it was, so a refusal (and, with one shard, an out-of-memory
        error) fails the new requests only and the running batch goes on; any other failure fails it too
        (tensor-parallel shards could have diverged)."""
        code = err.code.name if err.code is not None else None
        new_ids = [p.id for p in entries]
        if code in REFUSALS and len(entries) > 1:
            self._fail([batch_id], [], str(err))
            log.info("Prefill of %d requests refused (%s): retrying them one by one", len(entries), code)
            if cached is None:
                return [b for p in entries for b in self._prefill([p])]
            for p in entries:
                cached = next(iter(self._prefill([p], cached)), None)
            return [cached] if cached is not None else []
        kept = code in REFUSALS or (code == "RESOURCE_EXHAUSTED" and self.client.world_size == 1)
        if cached is not None and kept:
            self._fail([batch_id], new_ids, str(err), code, at_prefill=True)
            return [cached]
        batch_ids = [batch_id] + ([cached.id] if cached is not None else [])
        self._fail(batch_ids, [*(cached.request_ids if cached is not None else ()), *new_ids], str(err), code, True)
        return []

    def _decode(self, batches: list[pb.CachedBatch]) -> pb.CachedBatch | None:
        ids = [rid for b in batches for rid in b.request_ids]
        start = time.perf_counter()
        try:
            generations, cached = self.client.decode(batches)
        except ShardError as err:
            self._fail([b.id for b in batches], ids, str(err), err.code.name if err.code is not None else None)
            return None
        self._observe("decode", start, len(ids))
        self.stats.decodes += 1
        return self._after_step(generations, cached, ids)

    def _observe(self, method: str, start: float, batch_size: int) -> None:
        if self.step_observer is not None:
            try:
                self.step_observer(StepRecord(method, time.perf_counter() - start, batch_size))
            except Exception:  # an observer never breaks serving
                log.exception("step observer failed")

    def _after_step(
        self, generations: list[pb.Generation], cached: pb.CachedBatch | None, ids: list[int]
    ) -> pb.CachedBatch | None:
        """Route generations to handles; free finished and cancelled requests' blocks; FilterBatch /
        ClearCache. Finished handles are released last, so a caller woken by `result()` sees settled state."""
        sched = self.scheduler
        self.stats.steps += 1
        finished: list[Pending] = []
        rows: list[tuple[bool, int]] = []
        for gen in generations:
            p = sched.in_flight.get(gen.request_id)
            if p is None:
                log.warning("generation for unknown request id %d ignored", gen.request_id)
                continue
            rows.append((p.prefilled, len(gen.next_tokens.ids)))
            if p.handle._on_generation(gen):
                finished.append(p)
        with self.cv:
            self.stats.tokens_generated += sum(n for _, n in rows)
            count_decode_rows(self.stats, rows)
        sched.prefilled([g.request_id for g in generations])
        try:
            retired = sched.release([p.id for p in finished])
            with self.cv:
                self.stats.requests_finished += len(retired)
            cancelled = sched.cancelled()
            self._fail([], [i for i in ids if i in cancelled], "cancelled by the caller", CANCELLED)
            if cached is None:  # every request of the step finished
                self._fail(
                    [],
                    [i for i in ids if i in sched.in_flight],
                    "the shards dropped the batch before the request finished",
                )
                return None
            present = set(cached.request_ids)
            self._fail(
                [],
                [i for i in ids if i in sched.in_flight and i not in present],
                f"the shards' batch {cached.id} lost the request",
            )
            keep = [rid for rid in cached.request_ids if rid in sched.in_flight]
            try:
                if not keep:
                    self.client.clear_cache(cached.id)
                    return None
                if len(keep) != len(cached.request_ids):
                    return self.client.filter_batch(cached.id, keep)
                return cached
            except ShardError as err:
                self._fail([cached.id], keep, str(err))
                return None
        finally:
            for p in finished:
                p.handle._finish()

    def _fail(
        self,
        batch_ids: list[int],
        request_ids: list[int],
        message: str,
        code: str | None = None,
        at_prefill: bool = False,
    ) -> None:
        """Fail these requests (free their blocks) and ClearCache these batches on every shard."""
        failed = self.scheduler.release(request_ids)
        with self.cv:
            self.stats.requests_failed += len(failed)
        if failed and code != CANCELLED:
            log.warning("failing requests %s: %s", [p.id for p in failed], message)
        for batch_id in batch_ids:
            try:
                self.client.clear_cache(batch_id)
            except ShardError as err:
                log.warning("ClearCache(%d) after a failure also failed: %s", batch_id, err)
        for p in failed:
            p.handle._fail(message, code, at_prefill)

    def _shutdown(self) -> None:
        """On the loop thread at close: fail everything, drop the running batch, refuse commands."""
        with self.cv:
            commands, self._commands = self._commands, []
        for p in self.scheduler.drain_queue():
            p.handle._fail("the router was closed")
        batch_ids = [self.running.id] if self.running is not None else []
        self.running = None
        if batch_ids or self.scheduler.in_flight:
            self._fail(batch_ids, list(self.scheduler.in_flight), "the router was closed")
        for cmd in commands:
            cmd.future.set_exception(RuntimeError("the router was closed"))

    def _health_probe(self) -> bool:
        ids = self.tokenizer.encode("liveness") if self.tokenizer is not None else []
        ok = True
        try:
            self.client.prefill(health_batch(ids, self.scheduler.use_blocks))
        except ShardError as err:
            log.warning("health probe failed: %s", err)
            ok = False
        try:
            self.client.clear_cache(HEALTH_ID)
        except ShardError as err:
            log.warning("health probe ClearCache failed: %s", err)
        return ok
