"""`Scheduler`: the router's request bookkeeping in plain Python (no RPCs): the waiting queue
(FIFO), the in-flight table, KV blocks taken on admission and given back on retirement, and
cancellations. One condition variable guards it; the router's loop also waits on it."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from router_client.blocks import BlockAllocator, slots_for
from router_client.requests import Pending


class Scheduler:
    """Waiting and in-flight requests and their KV blocks. Every method is thread-safe."""

    def __init__(self, blocks: BlockAllocator, use_blocks: bool, cv: threading.Condition | None = None) -> None:
        self.blocks = blocks
        self.use_blocks = use_blocks  # False: the shards allocate, requests carry no blocks/slots
        self.cv = cv or threading.Condition()
        self.queue: collections.deque[Pending] = collections.deque()
        self.in_flight: dict[int, Pending] = {}  # admitted, by request id (running + new batch)
        self._cancelled: set[int] = set()  # in flight, to be dropped after the current step

    def enqueue(self, pending: Pending) -> None:
        with self.cv:
            self.queue.append(pending)
            self.cv.notify_all()

    def admit(self, max_batch_size: int, prefill_budget: int, adapter_ready: Callable[[int], bool]) -> list[Pending]:
        """Take waiting requests FIFO while the batch size, the prefill-token budget (a lone request
        may exceed it), free blocks and their adapters (`adapter_ready(index)`) allow."""
        admitted: list[Pending] = []
        prefill_tokens = 0
        with self.cv:
            while self.queue:
                p = self.queue[0]
                if not adapter_ready(p.request.adapter_index):
                    break  # waits until its adapter fits the budget again
                if len(self.in_flight) + len(admitted) >= max_batch_size:
                    break
                if admitted and prefill_tokens + p.prompt_tokens > prefill_budget:
                    break
                blocks = self.blocks.allocate(p.n_blocks)
                if blocks is None:
                    break
                self.queue.popleft()
                p.blocks = blocks
                if self.use_blocks:
                    p.request.blocks[:] = blocks
                    p.request.slots[:] = slots_for(blocks, self.blocks.block_size, p.n_tokens)
                p.handle.admitted_at = time.perf_counter()
                admitted.append(p)
                prefill_tokens += p.prompt_tokens
            self.in_flight.update((p.id, p) for p in admitted)
        return admitted

    def release(self, request_ids: list[int]) -> list[Pending]:
        """Forget these in-flight requests and free their blocks; returns those that were in flight."""
        out: list[Pending] = []
        with self.cv:
            for rid in request_ids:
                p = self.in_flight.pop(rid, None)
                self._cancelled.discard(rid)
                if p is not None:
                    self.blocks.free(p.blocks)
                    p.blocks = []
                    out.append(p)
        return out

    def cancel(self, request_id: int) -> Pending | None:
        """A waiting request leaves the queue at once (returned: the caller fails its handle); an
        in-flight one is marked, and the router drops it after the step under way."""
        with self.cv:
            for p in self.queue:
                if p.id == request_id:
                    self.queue.remove(p)
                    return p
            if request_id in self.in_flight:
                self._cancelled.add(request_id)
                self.cv.notify_all()
            return None

    def cancelled(self) -> set[int]:
        """In-flight request ids cancelled and not yet released."""
        with self.cv:
            return set(self._cancelled)

    def drain_queue(self) -> list[Pending]:
        with self.cv:
            queued = list(self.queue)
            self.queue.clear()
            return queued

    def busy_adapters(self) -> set[int]:
        """Adapter indices of in-flight requests."""
        with self.cv:
            return {p.request.adapter_index for p in self.in_flight.values()}

    def users_of(self, adapter_index: int) -> list[int]:
        """Request ids, waiting or in flight, that use this adapter index."""
        with self.cv:
            return [p.id for p in (*self.queue, *self.in_flight.values()) if p.request.adapter_index == adapter_index]

    def head_adapter(self) -> int | None:
        """The adapter index of the first waiting request, if any."""
        with self.cv:
            return self.queue[0].request.adapter_index if self.queue else None
