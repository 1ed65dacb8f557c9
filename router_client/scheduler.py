"""`Scheduler`: the router's request bookkeeping in plain Python (no RPCs): the waiting queue
(FIFO), the in-flight table, KV blocks taken on admission (kv.py: the prefix cache in front of the
allocator) and given back on retirement, and cancellations. One condition variable guards it; the
router's loop also waits on it.

Admission spends a token budget per forward on the prompt tokens not served from the prefix
cache. With chunked prefill the budget is `max_batch_prefill_tokens - current_tokens` of the
running batch, and the last admitted prompt is cut to what is left (`Request.chunk_len`); without
it, a lone request may exceed the budget.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from router_client.blocks import slots_for
from router_client.kv import KVBlocks
from router_client.prefix_cache import CacheKey
from router_client.requests import Pending


class Scheduler:
    """Waiting and in-flight requests and their KV blocks. Every method is thread-safe.
    `cache_key(p)` gives a request's prefix-cache key (None: it neither reads nor feeds the cache)."""

    def __init__(
        self,
        blocks: KVBlocks,
        use_blocks: bool,
        cv: threading.Condition | None = None,
        cache_key: Callable[[Pending], CacheKey | None] | None = None,
    ) -> None:
        self.blocks = blocks
        self.use_blocks = use_blocks  # False: the shards allocate, requests carry no blocks/slots
        self.cache_key = cache_key or (lambda p: None)
        self.cv = cv or threading.Condition()
        self.queue: collections.deque[Pending] = collections.deque()
        self.in_flight: dict[int, Pending] = {}  # admitted, by request id (running + new batch)
        self._cancelled: set[int] = set()  # in flight, to be dropped after the current step

    def enqueue(self, pending: Pending) -> None:
        with self.cv:
            self.queue.append(pending)
            self.cv.notify_all()

    def admit(
        self,
        max_batch_size: int,
        budget: int,
        adapter_ready: Callable[[int], bool],
        chunking: bool = False,
    ) -> list[Pending]:
        """Take waiting requests FIFO while the batch size, the token budget (prompt tokens not
        cached; see the module docstring), free blocks and their adapters (`adapter_ready(index)`) allow."""
        admitted: list[Pending] = []
        tokens = 0
        with self.cv:
            while self.queue:
                p = self.queue[0]
                if not adapter_ready(p.request.adapter_index):
                    break  # waits until its adapter fits the budget again
                if len(self.in_flight) + len(admitted) >= max_batch_size:
                    break
                left = budget - tokens
                if chunking and left <= 0:
                    break
                key = self.cache_key(p)
                to_compute = p.prompt_tokens - self.blocks.peek(p, key)
                chunk = left if chunking and to_compute > left else None
                if admitted and not chunking and to_compute > left:
                    break
                if not self.blocks.take(p, key):
                    break
                self.queue.popleft()
                self._fill(p, chunk)
                admitted.append(p)
                tokens += to_compute if chunk is None else chunk
                if chunk is not None:
                    break  # the budget is spent
            self.in_flight.update((p.id, p) for p in admitted)
        return admitted

    def _fill(self, p: Pending, chunk: int | None) -> None:
        r = p.request
        if self.use_blocks:
            r.blocks[:] = p.blocks
            r.slots[:] = slots_for(p.blocks, self.blocks.block_size, p.n_tokens)
        r.cache_len = p.cache_len
        if chunk is None:
            r.ClearField("chunk_len")
        else:
            r.chunk_len = chunk
        p.handle.admitted_at = time.perf_counter()

    def release(self, request_ids: list[int]) -> list[Pending]:
        """Forget these in-flight requests and give their blocks back; returns those that were in flight."""
        out: list[Pending] = []
        with self.cv:
            for rid in request_ids:
                p = self.in_flight.pop(rid, None)
                self._cancelled.discard(rid)
                if p is not None:
                    self.blocks.give_back(p)
                    out.append(p)
        return out

    def prefilled(self, request_ids: list[int]) -> None:
        """These requests' first tokens came back: their prompt blocks may join the prefix cache."""
        with self.cv:
            for rid in request_ids:
                p = self.in_flight.get(rid)
                if p is not None:
                    self.blocks.computed(p)

    def clear_prefix_cache(self) -> int:
        """Evict every cached block no request references; returns how many were freed."""
        with self.cv:
            return self.blocks.clear_cache()

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
