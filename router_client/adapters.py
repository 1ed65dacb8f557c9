"""`AdapterScheduler`: adapter indices and the shards' adapter memory.

Indices start at 1 and are never reused. The shards' adapter memory budget is shared: the
DownloadAdapter `memory_fraction`s of the loaded adapters add up to at most 1, and idle adapters
are offloaded least recently used first to make room. An offloaded adapter keeps its index and is
loaded back when a request for it reaches the head of the queue. Load/Offload RPCs are made only
from the router's loop thread (tensor-parallel shards must see one call order).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from router_client.client import ShardedClient
from router_client.messages import AdapterInfo
from router_client.requests import ValidationError
from worker.pb import generate_pb2 as pb

log = logging.getLogger(__name__)


class AdapterBudgetFull(ValidationError):
    """The adapter needs memory that only adapters in use hold; retry when they finish."""


class AdapterScheduler:
    def __init__(self, client: ShardedClient, lock: threading.Condition) -> None:
        self.client = client
        self.lock = lock  # the router's: guards `adapters` and the use times
        self.adapters: dict[int, AdapterInfo] = {}
        self._used: dict[int, float] = {}  # index -> last admission (LRU offload)
        self._next_index = 1

    def add_preloaded(self, preloaded: Iterable[pb.AdapterInfo]) -> None:
        """Adapters the shards loaded at start-up (Info.preloaded_adapters) keep their indices."""
        for pre in preloaded:
            self.adapters[pre.adapter_index] = AdapterInfo(
                pre.adapter_index, pre.adapter_parameters, pre.adapter_source
            )
        self._next_index = max([1, *(i + 1 for i in self.adapters)])

    def find(self, params: pb.AdapterParameters, source: int) -> AdapterInfo | None:
        """The known adapter (loaded or offloaded) with exactly these parameters and source."""
        with self.lock:
            for info in self.adapters.values():
                if info.source == source and info.params == params:
                    return info
        return None

    def ready(self, index: int) -> bool:
        """True when requests for `index` can be admitted now (base model or loaded); records the use."""
        if index == 0:
            return True
        with self.lock:
            info = self.adapters.get(index)
            if info is not None and not info.loaded:
                return False
            self._used[index] = time.monotonic()
            return True

    def counts(self) -> tuple[int, int]:
        """(loaded, offloaded) adapters."""
        with self.lock:
            loaded = sum(a.loaded for a in self.adapters.values())
            return loaded, len(self.adapters) - loaded

    # ------------------------------------------------------------------ loop thread only

    def make_room(self, fraction: float, busy: set[int]) -> bool:
        """Offload idle adapters (not in `busy`), least recently used first, until `fraction` more
        fits the budget. False when it cannot."""
        with self.lock:
            loaded = [a for a in self.adapters.values() if a.loaded]
            used = sum(a.memory_fraction for a in loaded)
            idle = sorted((a for a in loaded if a.index not in busy), key=lambda a: self._used.get(a.index, 0))
        while used + fraction > 1.0 + 1e-6:
            if not idle:
                return False
            victim = idle.pop(0)
            self.client.offload_adapter(victim.params, victim.source, victim.index)
            victim.loaded = False
            used -= victim.memory_fraction
            log.info("offloaded idle adapter index %d to make room", victim.index)
        return True

    def reload(self, index: int, busy: set[int]) -> None:
        """Load an offloaded adapter back into its index when the budget allows."""
        with self.lock:
            info = self.adapters.get(index)
            if info is None or info.loaded:
                return
        if self.make_room(info.memory_fraction, busy):
            self.client.load_adapter(info.params, info.source, info.index)
            info.loaded = True

    def load(
        self,
        params: pb.AdapterParameters,
        source: int,
        api_token: str | None,
        memory_fraction: float,
        busy: set[int],
        reuse: bool = False,
    ) -> int:
        """LoadAdapter into a fresh index (or, with `reuse`, the index these parameters already have)."""
        known = self.find(params, source) if reuse else None
        if known is not None:
            return known.index
        if not self.make_room(memory_fraction, busy):
            raise AdapterBudgetFull(
                f"adapter {list(params.adapter_ids)} needs {memory_fraction:.3f} of the adapter "
                "memory budget and every loaded adapter is in use"
            )
        index = self._next_index
        self._next_index += 1  # burned even if loading fails: indices are never reused
        if not self.client.load_adapter(params, source, index, api_token):
            raise RuntimeError(f"a shard did not load adapter {list(params.adapter_ids)} into index {index}")
        with self.lock:
            self.adapters[index] = AdapterInfo(index, params, source, True, memory_fraction)
        return index

    def offload(self, index: int, users_of: Callable[[int], list[int]]) -> None:
        """OffloadAdapter on every shard; refused while requests (`users_of(index)`, read under the
        shared lock) need it."""
        with self.lock:
            adapter = self.adapters.get(index)
            if adapter is None or not adapter.loaded:
                raise ValidationError(f"adapter index {index} is not loaded")
            users = users_of(index)
            if users:
                raise ValidationError(f"adapter index {index} is in use by requests {users}")
            adapter.loaded = False  # no new request may use it from here on
        try:
            self.client.offload_adapter(adapter.params, adapter.source, index)
        except BaseException:
            with self.lock:
                adapter.loaded = True
            raise
