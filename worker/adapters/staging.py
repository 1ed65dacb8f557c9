"""Host copies of adapters and the slot fills from them: the staging buffer and the pinning thread.

A host copy (HostAdapter) is kept for every known adapter, so a reload after offload reads nothing from
disk. On CUDA, a cold load reads the file's data section straight into one pinned staging buffer
(allocated once, the size of a whole adapter at the maximum rank in the pool dtype): no CPU pass over the
values, and page-locking (about 1 ms per MB on an H200 host) is never waited for. A background thread then
folds the scale in and keeps this rank's shard in the pool dtype in pinned memory of the adapter's own,
from which a reload is one asynchronous copy per tensor; a load that needs the staging buffer before that
first keeps a pageable copy of the bytes left there.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from worker.adapters.host import HostAdapter, read_adapter_bytes
from worker.adapters.peft import LoraAdapter
from worker.adapters.slots import SlotPool
from worker.config import QwenConfig
from worker.distributed import bind_thread, resolve_device

log = logging.getLogger(__name__)


class HasHostCopy(Protocol):
    """What owns a host copy (the pool's entry of one adapter index); the pinning thread swaps it."""

    host: HostAdapter | None


@dataclass
class Staging:
    """CUDA only: the pinned staging buffer, the side stream that copies into slots, the pinning thread."""

    buf: torch.Tensor  # pinned uint8, a whole adapter at the maximum rank in the pool dtype
    copy_stream: torch.cuda.Stream
    pinner: concurrent.futures.ThreadPoolExecutor  # pins host copies off the load path
    done: torch.cuda.Event | None = None  # the last copy out of buf
    holder: weakref.ref | None = None  # a HostAdapter whose only bytes are in buf
    pinning: list[concurrent.futures.Future] = field(default_factory=list)

    def holds(self, host: HostAdapter) -> bool:
        """Whether `host`'s bytes are the staging buffer's."""
        return host.buf.data_ptr() == self.buf.data_ptr()


class HostCopies:
    """Reads host copies (into the staging buffer on CUDA), fills slots from them, pins them off the load
    path. `lock` guards the staging buffer and every swap of an owner's host copy."""

    def __init__(self, slots: SlotPool, config: QwenConfig, dtype: torch.dtype):
        self.slots = slots
        self.config = config
        self.dtype = dtype
        self.device = slots.pctx.device
        self.readers = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="adapter-read")  # parallel pread
        self.lock = threading.Lock()
        self.staging: Staging | None = None
        if self.device.type == "cuda":
            pinner = concurrent.futures.ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="adapter-pin",
                initializer=bind_thread,
                initargs=(resolve_device(self.device),),
            )
            t0 = time.perf_counter()
            buf = torch.empty(slots.adapter_bytes(dtype), dtype=torch.uint8, pin_memory=True)
            log.info(
                "adapter staging buffer: %.1f MiB pinned in %.0f ms",
                buf.numel() / 2**20,
                (time.perf_counter() - t0) * 1e3,
            )
            self.staging = Staging(buf, torch.cuda.Stream(self.device), pinner)

    def read(self, path: str | None, max_rank: int, read_weights: Callable[[], LoraAdapter]) -> HostAdapter:
        """A host copy: the safetensors file at `path` as its bytes (on CUDA straight into the staging
        buffer); else (no path: a merge; .bin files; files that do not fit) `read_weights()` kept in the pool
        dtype, so it fits the staging buffer too."""
        host = None
        if path is not None:
            if self.staging is not None:
                with self.lock:
                    claim = functools.partial(self._claim, self.staging)
                    host = read_adapter_bytes(path, self.config, max_rank, claim, self.readers)
                    if host is not None:
                        self.staging.holder = weakref.ref(host)
            else:
                host = read_adapter_bytes(path, self.config, max_rank, _pageable, self.readers)
        if host is None:
            adapter = read_weights()  # a merge comes in fp32: rounded once here
            host = HostAdapter.from_weights(
                LoraAdapter(
                    adapter.rank,
                    {key: (a.to(self.dtype), b.to(self.dtype)) for key, (a, b) in adapter.weights.items()},
                )
            )
        return host

    @staticmethod
    def _claim(staging: Staging, nbytes: int) -> torch.Tensor | None:
        """The staging buffer's first `nbytes` (None: they do not fit), once the copies out of it are done
        and the bytes it held for an adapter without a copy of its own were copied out. Under the lock."""
        if nbytes > staging.buf.numel():
            return None
        holder = staging.holder() if staging.holder is not None else None
        if holder is not None and staging.holds(holder):
            holder.buf = holder.buf.clone()  # pageable; the pinning thread pins it later
        staging.holder = None
        if staging.done is not None:
            staging.done.synchronize()
        return staging.buf[:nbytes]

    def fill(self, slot: int, owner: HasHostCopy, ranks: torch.Tensor) -> dict[str, float]:
        """Copy the owner's adapter (this rank's shard, scale folded into B) and `ranks` into `slot` (all
        zeros); the phases' times in ms (CUDA). On CUDA the copies run on a side stream ordered after the
        main stream's work so far (the zeroing, steps still reading the slot), with the main stream's later
        work ordered after them; straight from a pinned host copy or from the staging buffer the cold read
        left the bytes in, else from the staging buffer after one copy into it; an unpinned host copy is
        then queued for pinning. A fill that fails part-way leaves the slot zeroed again."""
        host, staging = owner.host, self.staging
        if host is None:
            raise ValueError(f"slot {slot}: no host copy to fill it from")
        if staging is None:
            try:
                self.slots.copy_into(slot, host, host.buf, ranks, non_blocking=False)
            except BaseException:
                self.slots.zero(slot)
                raise
            return {}
        with self.lock:
            t0 = time.perf_counter()
            staged = not host.pinned  # read together with buf: the pinning thread swaps both
            src = host.buf
            if staged and not staging.holds(host):
                claimed = self._claim(staging, host.nbytes)  # None: too big (never, by read's dtypes)
                src = host.buf if claimed is None else claimed.copy_(host.buf)  # pageable: synchronous copies
            t1 = time.perf_counter()
            main = torch.cuda.current_stream(self.device)
            staging.copy_stream.wait_stream(main)
            try:
                with torch.cuda.stream(staging.copy_stream):
                    self.slots.copy_into(slot, host, src, ranks, non_blocking=True)  # src and ranks are pinned
            except BaseException:
                main.wait_stream(staging.copy_stream)
                self.slots.zero(slot)  # on the main stream, after whatever copies were queued
                raise
            finally:
                if src.data_ptr() == staging.buf.data_ptr():  # staging is not reused before these copies end
                    staging.done = torch.cuda.Event()
                    staging.done.record(staging.copy_stream)
            main.wait_stream(staging.copy_stream)
            timing = {"stage_ms": (t1 - t0) * 1e3, "issue_ms": (time.perf_counter() - t1) * 1e3}
        if staged:
            future = staging.pinner.submit(self._pin, staging, owner, host)
            future.add_done_callback(_log_pin_failure)
            staging.pinning = [f for f in staging.pinning if not f.done()] + [future]
        return timing

    def _pin(self, staging: Staging, owner: HasHostCopy, host: HostAdapter) -> None:
        """Background: a host copy in pinned memory of its own, with read_adapter's values in the pool dtype
        and only this rank's shard (a reload is then plain copies); swapped in unless the owner moved on
        meanwhile. Bytes still in the staging buffer are read under the lock (a load would reuse it)."""
        cut = self.slots.cut if self.slots.pctx.world_size > 1 and not host.cut else None
        weights = None
        with self.lock:
            if owner.host is not host or host.pinned:
                return
            if staging.holds(host):
                weights = host.folded(self.dtype, cut)
        if weights is None:  # its own pageable bytes: nothing else writes them
            weights = host.folded(self.dtype, cut)
        pinned = HostAdapter.from_weights(
            weights, lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True), cut=cut is not None or host.cut
        )
        with self.lock:
            if owner.host is host:
                owner.host = pinned
            if staging.holder is not None and staging.holder() is host:
                staging.holder = None  # replaced: nothing to keep from the staging buffer

    def wait_pinned(self) -> None:
        """Block until the queued host copies are pinned. A failed one was logged and is not raised here."""
        if self.staging is not None:
            concurrent.futures.wait(self.staging.pinning)
            self.staging.pinning = []

    def drop(self, owners: Iterable[HasHostCopy]) -> None:
        """Forget these owners' host copies (under the lock: the pinning thread swaps host copies)."""
        with self.lock:
            for owner in owners:
                owner.host = None


def _log_pin_failure(future: concurrent.futures.Future) -> None:
    if future.exception() is not None:  # the slot was filled already: only reloads stay on the staged path
        log.warning("pinning an adapter's host copy failed: %r", future.exception())


def _pageable(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)
