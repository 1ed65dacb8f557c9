"""`Router`: LoRAX's serving loop for one model, in a background thread (loop.py).

Startup (as LoRAX): ServiceDiscovery (in `ShardedClient.connect`) → ClearCache(None) → Info →
Warmup → a KV block pool of `max_supported_total_tokens // block_size` blocks, block 0 reserved
for the health probe (startup.py). Requests are checked before they are queued (admission.py).
Then continuous batching: requests wait FIFO (scheduler.py), join the running
batch when KV blocks, the batch size and the prefill budget allow, and leave it (FilterBatch) when
they finish or are cancelled. A failed Prefill/Decode fails the requests of the batches involved,
frees their blocks, ClearCaches those batch ids, and serving goes on; a Prefill of several requests
that the shards refuse (INVALID_ARGUMENT, FAILED_PRECONDITION) is retried one request per batch, so
only the refused request fails. Adapters: adapters.py.

Every RPC that drives the shards (steps, health probe, LoadAdapter/OffloadAdapter) is made from
the loop thread, so all shards see the same call order (tensor-parallel shards run collectives).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from router_client.adapters import AdapterScheduler
from router_client.admission import Admission
from router_client.client import ShardedClient
from router_client.loop import ServingLoop
from router_client.messages import (
    HEALTH_ID,
    AdapterInfo,
    RouterConfig,
    RouterLoad,
    RouterStats,
    StepRecord,
    Tokenizer,
    adapter_parameters,
    adapter_source,
)
from router_client.requests import CANCELLED, GenerationResult, Pending, RequestError, RequestHandle, ValidationError
from router_client.scheduler import Scheduler
from router_client.snapshot import debug_state, router_load
from router_client.startup import start_shards
from worker.pb import generate_pb2 as pb

__all__ = ["Router", "RouterConfig", "RouterStats", "AdapterInfo", "HEALTH_ID"]
log = logging.getLogger(__name__)


class Router:
    """Continuous batching over the shards of one model. Build with `Router.connect(...)`, or
    `Router(client, ...).start()`; use as a context manager or call `close()`. `step_observer`, if
    set, is called on the loop thread after every Prefill and Decode."""

    def __init__(
        self,
        client: ShardedClient,
        tokenizer: Tokenizer | None = None,
        config: RouterConfig | None = None,
        owns_client: bool = True,
    ) -> None:
        self.config = config or RouterConfig()
        self.config.validate()
        self.client = client
        self.tokenizer = tokenizer
        self.owns_client = owns_client
        self.info: pb.InfoResponse | None = None
        self.max_supported_total_tokens = 0
        self._step_observer: Callable[[StepRecord], None] | None = None
        self._cv = threading.Condition()
        self._adapters = AdapterScheduler(client, self._cv)
        self._admission: Admission | None = None
        self._scheduler: Scheduler | None = None
        self._loop: ServingLoop | None = None
        self._next_request_id = 0

    @classmethod
    def connect(
        cls, uds_path_of_shard0: str, tokenizer: Tokenizer | None = None, config: RouterConfig | None = None
    ) -> Router:
        """Connect to running shards (shard 0's socket path, e.g. `/tmp/qwen-0`), run the startup
        sequence and start serving."""
        config = config or RouterConfig()
        client = ShardedClient.connect(
            uds_path_of_shard0, timeout_s=config.call_timeout_s, connect_timeout_s=config.connect_timeout_s
        )
        router = cls(client, tokenizer, config)
        try:
            return router.start()
        except BaseException:
            client.close()
            raise

    # ------------------------------------------------------------------ startup / shutdown

    def start(self) -> Router:
        """ClearCache(None) → Info → Warmup → block pool (startup.py) → serving thread."""
        shards = start_shards(self.client, self.config)
        info = self.info = shards.info
        self.max_supported_total_tokens = shards.max_supported_total_tokens
        admission = self._admission = Admission(self.config, self.tokenizer, shards.blocks, info.speculate)
        sched = self._scheduler = Scheduler(shards.blocks, info.requires_block_allocator, self._cv, admission.cache_key)
        self._adapters.add_preloaded(info.preloaded_adapters)
        self._loop = ServingLoop(
            self.client,
            sched,
            self._adapters,
            self.config,
            self.tokenizer,
            self._cv,
            chunking=shards.chunking,
            speculate=info.speculate,
        )
        self._loop.step_observer = self._step_observer
        self._loop.start()
        return self

    def close(self) -> None:
        """Stop the loop (failing waiting and running requests), drop their batches, close the channels."""
        if self._loop is not None:
            self._loop.stop()
        if self.owns_client:
            self.client.close()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public API

    def submit(
        self,
        prompt: str | Sequence[int],
        parameters: dict[str, Any] | None = None,
        stopping: dict[str, Any] | None = None,
        adapter_index: int = 0,
        prefill_logprobs: bool = False,
        truncate: int = 0,
    ) -> RequestHandle:
        """Queue one request; raises ValidationError at once if it is malformed or can never fit."""
        admission, sched = self._admission, self._scheduler
        assert admission is not None and sched is not None, "call start() first"
        checked = admission.check(prompt, parameters, stopping, truncate)
        sampling = checked.sampling
        with self._cv:
            if self._loop is None or self._loop.stopping:
                raise RequestError("the router is not running")
            adapter = self.adapters.get(adapter_index)
            if adapter_index != 0 and adapter is None:  # known but offloaded: reloaded when admitted
                raise ValidationError(f"adapter index {adapter_index} is not loaded (load_adapter() first)")
            if adapter is not None and not sampling.adapter_id:
                sampling.adapter_id = ",".join(adapter.ids)
            handle = RequestHandle(self._next_request_id, checked.ids)
            self._next_request_id += 1
            request = pb.Request(
                id=handle.request_id,
                inputs=checked.text,
                tokenized_inputs=pb.TokenizedInputs(ids=checked.ids),
                truncate=truncate,
                parameters=sampling,
                stopping_parameters=checked.stop,
                prefill_logprobs=prefill_logprobs,
                adapter_index=adapter_index,
            )
            sched.enqueue(Pending(handle, request, checked.n_blocks, checked.n_tokens))
        return handle

    def generate(self, prompt: str | Sequence[int], timeout: float | None = None, **kwargs: Any) -> GenerationResult:
        """`submit(prompt, **kwargs).result(timeout)`."""
        return self.submit(prompt, **kwargs).result(timeout)

    def cancel(self, request_id: int) -> None:
        """Cancel a request: a waiting one leaves the queue now; a running one is dropped from its
        batch (FilterBatch) and its KV blocks freed after the step under way. Its handle fails with
        code CANCELLED; cancelling a finished or unknown request does nothing."""
        assert self._scheduler is not None, "call start() first"
        waiting = self._scheduler.cancel(request_id)
        if waiting is not None:
            waiting.handle._fail("cancelled by the caller", CANCELLED)

    def health_probe(self) -> bool:
        """LoRAX's generation liveness check: a one-token Prefill (batch and request id 2^64-1,
        block 0, slot 0, max_new_tokens 1) then ClearCache(2^64-1). True when the Prefill succeeded."""
        return self._loop_or_raise().health_probe()

    def load_adapter(
        self,
        adapter_id: str | Sequence[str] | pb.AdapterParameters,
        source: str | int = "LOCAL",
        api_token: str | None = None,
        reuse: bool = False,
    ) -> int:
        """DownloadAdapter on shard 0, then LoadAdapter on every shard into a fresh index (from 1,
        never reused). Several ids (or AdapterParameters) ask the shards for a merge. With `reuse`,
        an adapter already known with the same parameters keeps its index (an offloaded one is loaded
        back when a request needs it). Returns the index."""
        params = adapter_parameters(adapter_id)
        src = adapter_source(source)
        if reuse and (known := self._adapters.find(params, src)) is not None:
            return known.index
        downloaded = self.client.download_adapter(params, src, api_token)  # shard 0; no collectives
        busy = self._scheduler.busy_adapters if self._scheduler is not None else set
        return self._loop_or_raise().run(
            lambda: self._adapters.load(params, src, api_token, downloaded.memory_fraction, busy(), reuse)
        )

    def offload_adapter(self, index: int) -> None:
        """OffloadAdapter on every shard; refused while a waiting or running request uses it."""
        sched = self._scheduler
        assert sched is not None, "call start() first"
        self._loop_or_raise().run(lambda: self._adapters.offload(index, sched.users_of))

    @property
    def step_observer(self) -> Callable[[StepRecord], None] | None:
        return self._step_observer

    @step_observer.setter
    def step_observer(self, fn: Callable[[StepRecord], None] | None) -> None:
        self._step_observer = fn
        if self._loop is not None:
            self._loop.step_observer = fn

    @property
    def adapters(self) -> dict[int, AdapterInfo]:
        """Known adapters by index (loaded or offloaded)."""
        return self._adapters.adapters

    @property
    def stats(self) -> RouterStats:
        with self._cv:
            return RouterStats(**asdict(self._loop.stats)) if self._loop is not None else RouterStats()

    def load(self) -> RouterLoad:
        """Queue, batch, KV blocks and adapters now."""
        sched = self._scheduler
        assert sched is not None, "call start() first"
        counts = self._adapters.counts()
        with self._cv:
            return router_load(sched, self._loop, counts, self.info.speculate if self.info is not None else 0)

    def clear_prefix_cache(self) -> int:
        """Evict every cached prompt block no request uses; returns how many blocks were freed."""
        assert self._scheduler is not None, "call start() first"
        return self._scheduler.clear_prefix_cache()

    def debug_state(self) -> dict[str, Any]:
        """A snapshot for tests and debugging: KV blocks, queue, batch, adapters, counters."""
        with self._cv:
            return debug_state(self._scheduler, self._loop, self.adapters, self.max_supported_total_tokens)

    # ------------------------------------------------------------------ helpers

    def _loop_or_raise(self) -> ServingLoop:
        if self._loop is None:
            raise RuntimeError("the router is not running")
        return self._loop
