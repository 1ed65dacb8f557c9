"""`Router`: LoRAX's serving loop for one model, in a background thread (loop.py).

Startup (as LoRAX): ServiceDiscovery (in `ShardedClient.connect`) → ClearCache(None) → Info →
Warmup → a KV block pool of `max_supported_total_tokens // block_size` blocks, block 0 reserved
for the health probe. Then continuous batching: requests wait FIFO (scheduler.py), join the running
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
from router_client.blocks import BlockAllocator, blocks_needed, tokens_needed
from router_client.client import ShardedClient
from router_client.kv import KVBlocks, choose_prefix_cache
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
    sampling_parameters,
    stopping_parameters,
    warmup_batch,
)
from router_client.prefix_cache import CacheKey, ntk_alpha
from router_client.requests import CANCELLED, GenerationResult, Pending, RequestError, RequestHandle, ValidationError
from router_client.scheduler import Scheduler
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
        """ClearCache(None) → Info → Warmup → block pool → serving thread."""
        c = self.config
        self.client.clear_cache(None, timeout_s=c.connect_timeout_s, wait_for_ready=True)
        info = self.info = self.client.info()
        if not info.supports_generation:
            raise RuntimeError("the shards do not support generation (Info.supports_generation is false)")
        total = None
        if c.warmup:
            total = self.client.warmup(
                warmup_batch(c),
                c.max_input_length,
                c.max_batch_prefill_tokens,
                c.max_total_tokens - c.max_input_length,
                timeout_s=c.warmup_timeout_s,
            )
        total = total if total is not None else c.max_batch_total_tokens
        if total is None:
            raise RuntimeError("Warmup reported no max_supported_total_tokens: set RouterConfig.max_batch_total_tokens")
        self.max_supported_total_tokens = total
        chunking = c.chunked_prefill and info.chunked_prefill
        if not chunking:
            c.check_unchunked()
        prefix, why = choose_prefix_cache(c, info, self.client.health)
        blocks = KVBlocks(BlockAllocator(total // info.block_size, info.block_size), prefix)
        sched = self._scheduler = Scheduler(blocks, info.requires_block_allocator, self._cv, self._cache_key)
        self._adapters.add_preloaded(info.preloaded_adapters)
        log.info(
            "router ready: %d shard(s), block_size %d, %d KV tokens -> %d usable blocks, block allocator %s, "
            "chunked prefill %s, prefix caching %s, speculative decoding %s",
            self.client.world_size,
            info.block_size,
            total,
            blocks.capacity,
            "on" if info.requires_block_allocator else "off (shards allocate)",
            f"on ({c.max_batch_prefill_tokens} tokens per forward)"
            if chunking
            else "off (" + ("not offered by the shards" if c.chunked_prefill else "disabled") + ")",
            why,
            f"on ({info.speculate} drafts per step)" if info.speculate else "off",
        )
        self._loop = ServingLoop(
            self.client, sched, self._adapters, c, self.tokenizer, self._cv, chunking=chunking, speculate=info.speculate
        )
        self._loop.step_observer = self._step_observer
        self._loop.start()
        return self

    def _cache_key(self, p: Pending) -> CacheKey | None:
        """(adapter index, NTK alpha of the whole prompt); None for requests asking for prefill logprobs."""
        c = self.config
        if p.request.prefill_logprobs or c.seq_length is None:
            return None
        return (p.request.adapter_index, ntk_alpha(p.prompt_tokens, c.seq_length, c.use_dynamic_ntk))

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
        text, ids = self._tokenize(prompt)
        if truncate and truncate < len(ids):
            ids = ids[-truncate:]
        c = self.config
        if not ids:
            raise ValidationError("the prompt is empty")
        if len(ids) > c.max_input_length:
            raise ValidationError(
                f"the prompt has {len(ids)} tokens, more than max_input_length {c.max_input_length} "
                "(pass truncate= to keep the last tokens)"
            )
        sampling, stop = sampling_parameters(parameters), stopping_parameters(stopping)
        if len(ids) + stop.max_new_tokens > c.max_total_tokens:
            raise ValidationError(
                f"prompt ({len(ids)}) + max_new_tokens ({stop.max_new_tokens}) exceeds "
                f"max_total_tokens {c.max_total_tokens}"
            )
        sched = self._scheduler
        assert sched is not None and self.info is not None, "call start() first"
        speculate, block_size = self.info.speculate, sched.blocks.block_size
        n_blocks = blocks_needed(len(ids), stop.max_new_tokens, block_size, speculate)
        n_tokens = tokens_needed(len(ids), stop.max_new_tokens, speculate)
        if n_blocks > sched.blocks.capacity:
            raise ValidationError(
                f"the request needs {n_blocks} KV blocks ({n_tokens} tokens) but the pool has "
                f"only {sched.blocks.capacity} usable blocks of {block_size}: it can never run"
            )
        with self._cv:
            if self._loop is None or self._loop.stopping:
                raise RequestError("the router is not running")
            adapter = self.adapters.get(adapter_index)
            if adapter_index != 0 and adapter is None:  # known but offloaded: reloaded when admitted
                raise ValidationError(f"adapter index {adapter_index} is not loaded (load_adapter() first)")
            if adapter is not None and not sampling.adapter_id:
                sampling.adapter_id = ",".join(adapter.ids)
            handle = RequestHandle(self._next_request_id, ids)
            self._next_request_id += 1
            request = pb.Request(
                id=handle.request_id,
                inputs=text,
                tokenized_inputs=pb.TokenizedInputs(ids=ids),
                truncate=truncate,
                parameters=sampling,
                stopping_parameters=stop,
                prefill_logprobs=prefill_logprobs,
                adapter_index=adapter_index,
            )
            sched.enqueue(Pending(handle, request, n_blocks, n_tokens))
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
        loaded, offloaded = self._adapters.counts()
        with self._cv:
            running = self._loop.running if self._loop is not None else None
            st = sched.blocks.stats
            steps = self._loop.stats if self._loop is not None else RouterStats()
            return RouterLoad(
                len(sched.queue),
                len(sched.in_flight),
                running.size if running is not None else 0,
                running.max_tokens if running is not None else 0,
                sched.blocks.used_count,
                sched.blocks.free_count,
                loaded,
                offloaded,
                sched.blocks.cached_count,
                st.lookups,
                st.hits,
                st.lookup_tokens,
                st.hit_tokens,
                self.info.speculate if self.info is not None else 0,
                steps.decode_rows,
                steps.decode_tokens,
            )

    def clear_prefix_cache(self) -> int:
        """Evict every cached prompt block no request uses; returns how many blocks were freed."""
        assert self._scheduler is not None, "call start() first"
        return self._scheduler.clear_prefix_cache()

    def debug_state(self) -> dict[str, Any]:
        """A snapshot for tests and debugging: KV blocks, queue, batch, adapters, counters."""
        sched, loop = self._scheduler, self._loop
        with self._cv:
            running = loop.running if loop is not None else None
            blocks = sched.blocks if sched is not None else None
            return {
                "free_blocks": blocks.free_count if blocks else 0,
                "usable_blocks": blocks.capacity if blocks else 0,
                "used_blocks": blocks.used_count if blocks else 0,
                "cached_blocks": blocks.cached_count if blocks else 0,
                "allocator_free_blocks": blocks.allocator.free_count if blocks else 0,
                "prefix_cache": asdict(blocks.stats) if blocks else {},
                "block_size": blocks.block_size if blocks else 0,
                "max_supported_total_tokens": self.max_supported_total_tokens,
                "queued": [p.id for p in sched.queue] if sched else [],
                "in_flight": sorted(sched.in_flight) if sched else [],
                "running_batch": None
                if running is None
                else {"id": running.id, "request_ids": list(running.request_ids)},
                "adapters": {i: {"ids": a.ids, "loaded": a.loaded} for i, a in self.adapters.items()},
                "stats": asdict(loop.stats if loop is not None else RouterStats()),
            }

    # ------------------------------------------------------------------ helpers

    def _loop_or_raise(self) -> ServingLoop:
        if self._loop is None:
            raise RuntimeError("the router is not running")
        return self._loop

    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValidationError("a text prompt needs a tokenizer: pass tokenizer= to the Router, or token ids")
            return prompt, list(self.tokenizer.encode(prompt))
        ids = [int(i) for i in prompt]
        decode = getattr(self.tokenizer, "decode", None)
        return (decode(ids) if decode is not None else ""), ids
