"""`Router`: LoRAX's serving loop for one model, in a background thread.

Startup (as LoRAX): ServiceDiscovery (in `ShardedClient.connect`) → ClearCache(None) → Info →
Warmup → a KV block pool of `max_supported_total_tokens // block_size` blocks, block 0 reserved
for the health probe. Each loop step: admit waiting requests FIFO while KV blocks, the batch size
and the prefill-token budget allow; Prefill them as a new batch; Decode the running batch together
with the new one (`Decode(batches=[running, new])`, the shards merge them keeping the running id);
then FilterBatch / ClearCache away whatever finished. A failed Prefill/Decode fails the requests
of the batches involved, frees their blocks, ClearCaches those batch ids, and serving goes on.

Every RPC that drives the shards (steps, health probe, LoadAdapter/OffloadAdapter) is made from
the loop thread, so all shards see the same call order (tensor-parallel shards run collectives).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from router_client.blocks import BlockAllocator, blocks_needed, slots_for, tokens_needed
from router_client.client import ShardedClient, ShardError
from router_client.messages import (HEALTH_ID, AdapterInfo, RouterConfig, RouterStats, Tokenizer,
                                    adapter_parameters, adapter_source, health_batch, sampling_parameters,
                                    stopping_parameters, warmup_batch)
from router_client.requests import GenerationResult, Pending, RequestError, RequestHandle, ValidationError
from worker.pb import generate_pb2 as pb

__all__ = ["Router", "RouterConfig", "RouterStats", "AdapterInfo", "HEALTH_ID"]
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Command:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


class Router:
    """Continuous batching over the shards of one model. Build with `Router.connect(...)`, or
    `Router(client, ...).start()`; use as a context manager or call `close()`."""

    def __init__(self, client: ShardedClient, tokenizer: Tokenizer | None = None,
                 config: RouterConfig | None = None, owns_client: bool = True) -> None:
        self.config = config or RouterConfig()
        self.config.validate()
        self.client = client
        self.tokenizer = tokenizer
        self.owns_client = owns_client
        self.info: pb.InfoResponse | None = None
        self.max_supported_total_tokens = 0
        self.adapters: dict[int, AdapterInfo] = {}
        self._stats = RouterStats()
        self._blocks: BlockAllocator | None = None
        self._use_blocks = True
        self._cv = threading.Condition()
        self._queue: collections.deque[Pending] = collections.deque()  # waiting, FIFO
        self._in_flight: dict[int, Pending] = {}  # admitted, by request id (running + new batch)
        self._running: pb.CachedBatch | None = None
        self._commands: list[_Command] = []
        self._next_request_id = 0
        self._next_batch_id = 0
        self._next_adapter_index = 1
        self._adapter_used: dict[int, float] = {}  # adapter index -> last admission (LRU offload)
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def connect(cls, uds_path_of_shard0: str, tokenizer: Tokenizer | None = None,
                config: RouterConfig | None = None) -> "Router":
        """Connect to running shards (shard 0's socket path, e.g. `/tmp/qwen-0`), run the startup
        sequence and start serving."""
        config = config or RouterConfig()
        client = ShardedClient.connect(uds_path_of_shard0, timeout_s=config.call_timeout_s,
                                       connect_timeout_s=config.connect_timeout_s)
        router = cls(client, tokenizer, config)
        try:
            return router.start()
        except BaseException:
            client.close()
            raise

    # ------------------------------------------------------------------ startup / shutdown

    def start(self) -> "Router":
        """ClearCache(None) → Info → Warmup → block pool → serving thread."""
        c = self.config
        self.client.clear_cache(None, timeout_s=c.connect_timeout_s, wait_for_ready=True)
        info = self.info = self.client.info()
        if not info.supports_generation:
            raise RuntimeError("the shards do not support generation (Info.supports_generation is false)")
        total = None
        if c.warmup:
            total = self.client.warmup(warmup_batch(c), c.max_input_length, c.max_batch_prefill_tokens,
                                       c.max_total_tokens - c.max_input_length, timeout_s=c.warmup_timeout_s)
        total = total if total is not None else c.max_batch_total_tokens
        if total is None:
            raise RuntimeError("Warmup reported no max_supported_total_tokens: "
                               "set RouterConfig.max_batch_total_tokens")
        self.max_supported_total_tokens = total
        self._use_blocks = info.requires_block_allocator
        self._blocks = BlockAllocator(total // info.block_size, info.block_size)
        for pre in info.preloaded_adapters:
            self.adapters[pre.adapter_index] = AdapterInfo(pre.adapter_index, pre.adapter_parameters,
                                                           pre.adapter_source)
        self._next_adapter_index = max([1, *(i + 1 for i in self.adapters)])
        log.info("router ready: %d shard(s), block_size %d, %d KV tokens -> %d usable blocks, block allocator %s",
                 self.client.world_size, info.block_size, total, self._blocks.capacity,
                 "on" if self._use_blocks else "off (shards allocate)")
        self._thread = threading.Thread(target=self._loop, name="qwen-router-loop", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop (failing waiting and running requests), drop their batches, close the channels."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.owns_client:
            self.client.close()

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public API

    def submit(self, prompt: str | Sequence[int], parameters: dict[str, Any] | None = None,
               stopping: dict[str, Any] | None = None, adapter_index: int = 0, prefill_logprobs: bool = False,
               truncate: int = 0) -> RequestHandle:
        """Queue one request; raises ValidationError at once if it is malformed or can never fit."""
        text, ids = self._tokenize(prompt)
        if truncate and truncate < len(ids):
            ids = ids[-truncate:]
        c = self.config
        if not ids:
            raise ValidationError("the prompt is empty")
        if len(ids) > c.max_input_length:
            raise ValidationError(f"the prompt has {len(ids)} tokens, more than max_input_length {c.max_input_length} "
                                  "(pass truncate= to keep the last tokens)")
        sampling, stop = sampling_parameters(parameters), stopping_parameters(stopping)
        if len(ids) + stop.max_new_tokens > c.max_total_tokens:
            raise ValidationError(f"prompt ({len(ids)}) + max_new_tokens ({stop.max_new_tokens}) exceeds "
                                  f"max_total_tokens {c.max_total_tokens}")
        assert self._blocks is not None and self.info is not None, "call start() first"
        speculate, block_size = self.info.speculate, self._blocks.block_size
        n_blocks = blocks_needed(len(ids), stop.max_new_tokens, block_size, speculate)
        n_tokens = tokens_needed(len(ids), stop.max_new_tokens, speculate)
        if n_blocks > self._blocks.capacity:
            raise ValidationError(f"the request needs {n_blocks} KV blocks ({n_tokens} tokens) but the pool has "
                                  f"only {self._blocks.capacity} usable blocks of {block_size}: it can never run")
        with self._cv:
            if self._stopping or self._thread is None:
                raise RequestError("the router is not running")
            adapter = self.adapters.get(adapter_index)
            if adapter_index != 0 and adapter is None:  # known but offloaded: reloaded when admitted
                raise ValidationError(f"adapter index {adapter_index} is not loaded (load_adapter() first)")
            if adapter is not None and not sampling.adapter_id:
                sampling.adapter_id = ",".join(adapter.ids)
            handle = RequestHandle(self._next_request_id, ids)
            self._next_request_id += 1
            request = pb.Request(id=handle.request_id, inputs=text, tokenized_inputs=pb.TokenizedInputs(ids=ids),
                                 truncate=truncate, parameters=sampling, stopping_parameters=stop,
                                 prefill_logprobs=prefill_logprobs, adapter_index=adapter_index)
            self._queue.append(Pending(handle, request, n_blocks, n_tokens))
            self._cv.notify_all()
        return handle

    def generate(self, prompt: str | Sequence[int], timeout: float | None = None,
                 **kwargs: Any) -> GenerationResult:
        """`submit(prompt, **kwargs).result(timeout)`."""
        return self.submit(prompt, **kwargs).result(timeout)

    def health_probe(self) -> bool:
        """LoRAX's generation liveness check: a one-token Prefill (batch and request id 2^64-1,
        block 0, slot 0, max_new_tokens 1) then ClearCache(2^64-1). True when the Prefill succeeded."""
        return self._run_in_loop(self._health_probe)

    def load_adapter(self, adapter_id: str | Sequence[str] | pb.AdapterParameters, source: str | int = "LOCAL",
                     api_token: str | None = None) -> int:
        """DownloadAdapter on shard 0, then LoadAdapter on every shard into a fresh index (from 1,
        never reused). Several ids (or AdapterParameters) ask the shards for a merge. Returns the index."""
        params = adapter_parameters(adapter_id)
        src = adapter_source(source)
        downloaded = self.client.download_adapter(params, src, api_token)  # shard 0; no collectives
        return self._run_in_loop(lambda: self._load_adapter(params, src, api_token, downloaded.memory_fraction))

    def offload_adapter(self, index: int) -> None:
        """OffloadAdapter on every shard; refused while a waiting or running request uses it."""
        self._run_in_loop(lambda: self._offload_adapter(index))

    @property
    def stats(self) -> RouterStats:
        with self._cv:
            return RouterStats(**asdict(self._stats))

    def debug_state(self) -> dict[str, Any]:
        """A snapshot for tests and debugging: KV blocks, queue, batch, adapters, counters."""
        with self._cv:
            blocks = self._blocks
            return {
                "free_blocks": blocks.free_count if blocks else 0,
                "usable_blocks": blocks.capacity if blocks else 0,
                "used_blocks": blocks.used_count if blocks else 0,
                "block_size": blocks.block_size if blocks else 0,
                "max_supported_total_tokens": self.max_supported_total_tokens,
                "queued": [p.id for p in self._queue],
                "in_flight": sorted(self._in_flight),
                "running_batch": None if self._running is None else
                {"id": self._running.id, "request_ids": list(self._running.request_ids)},
                "adapters": {i: {"ids": a.ids, "loaded": a.loaded} for i, a in self.adapters.items()},
                "stats": asdict(self._stats),
            }

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._commands or self._queue or self._running is not None):
                        self._cv.wait()
                    if self._stopping:
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
                    batch_ids = [self._running.id] if self._running is not None else []
                    self._running = None
                    self._fail(batch_ids, list(self._in_flight), f"router error: {err!r}")
        finally:  # also when the loop itself broke: no handle is left waiting forever
            with self._cv:
                self._stopping = True
            self._shutdown()

    def _step(self) -> None:
        admitted = self._admit()
        new_batch = self._prefill(admitted) if admitted else None
        batches = [b for b in (self._running, new_batch) if b is not None]
        self._running = self._decode(batches) if batches else None

    def _admit(self) -> list[Pending]:
        """Take waiting requests FIFO while blocks, batch size, the prefill budget and the adapter
        memory budget allow (an offloaded adapter the next request needs is loaded back first)."""
        assert self._blocks is not None
        admitted: list[Pending] = []
        prefill_tokens = 0
        self._reload_head_adapter()
        with self._cv:
            while self._queue:
                p = self._queue[0]
                info = self.adapters.get(p.request.adapter_index)
                if info is not None and not info.loaded:
                    break  # waits until its adapter fits the budget again
                if p.request.adapter_index:
                    self._adapter_used[p.request.adapter_index] = time.monotonic()
                if len(self._in_flight) + len(admitted) >= self.config.max_batch_size:
                    break
                if admitted and prefill_tokens + p.prompt_tokens > self.config.max_batch_prefill_tokens:
                    break
                blocks = self._blocks.allocate(p.n_blocks)
                if blocks is None:
                    break
                self._queue.popleft()
                p.blocks = blocks
                if self._use_blocks:
                    p.request.blocks[:] = blocks
                    p.request.slots[:] = slots_for(blocks, self._blocks.block_size, p.n_tokens)
                admitted.append(p)
                prefill_tokens += p.prompt_tokens
            self._in_flight.update((p.id, p) for p in admitted)
        return admitted

    def _prefill(self, entries: list[Pending]) -> pb.CachedBatch | None:
        batch_id = self._next_batch_id
        self._next_batch_id += 1
        batch = pb.Batch(id=batch_id, requests=[p.request for p in entries], size=len(entries),
                         max_tokens=sum(p.n_tokens for p in entries), max_blocks=sum(len(p.blocks) for p in entries))
        ids = [p.id for p in entries]
        try:
            generations, cached = self.client.prefill(batch)
        except ShardError as err:
            self._fail([batch_id], ids, str(err))
            return None
        self._stats.prefills += 1
        return self._after_step(generations, cached, ids)

    def _decode(self, batches: list[pb.CachedBatch]) -> pb.CachedBatch | None:
        ids = [rid for b in batches for rid in b.request_ids]
        try:
            generations, cached = self.client.decode(batches)
        except ShardError as err:
            self._fail([b.id for b in batches], ids, str(err))
            return None
        self._stats.decodes += 1
        return self._after_step(generations, cached, ids)

    def _after_step(self, generations: list[pb.Generation], cached: pb.CachedBatch | None,
                    ids: list[int]) -> pb.CachedBatch | None:
        """Route generations to handles; free finished requests' blocks; FilterBatch / ClearCache.
        Finished handles are released last, so a caller woken by `result()` sees settled state."""
        self._stats.steps += 1
        finished: list[Pending] = []
        for gen in generations:
            p = self._in_flight.get(gen.request_id)
            if p is None:
                log.warning("generation for unknown request id %d ignored", gen.request_id)
                continue
            self._stats.tokens_generated += len(gen.next_tokens.ids)
            if p.handle._on_generation(gen):
                finished.append(p)
        try:
            self._retire(finished)
            if cached is None:  # every request of the step finished
                self._fail([], [i for i in ids if i in self._in_flight],
                           "the shards dropped the batch before the request finished")
                return None
            present = set(cached.request_ids)
            self._fail([], [i for i in ids if i in self._in_flight and i not in present],
                       f"the shards' batch {cached.id} lost the request")
            keep = [rid for rid in cached.request_ids if rid in self._in_flight]
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

    def _retire(self, entries: list[Pending]) -> None:
        """Forget finished requests and free their blocks (their handles are released by the caller)."""
        assert self._blocks is not None
        with self._cv:
            for p in entries:
                self._in_flight.pop(p.id, None)
                self._blocks.free(p.blocks)
                p.blocks = []
                self._stats.requests_finished += 1

    def _fail(self, batch_ids: list[int], request_ids: list[int], message: str) -> None:
        """Fail these requests (free their blocks) and ClearCache these batches on every shard."""
        assert self._blocks is not None
        failed: list[Pending] = []
        with self._cv:
            for rid in request_ids:
                p = self._in_flight.pop(rid, None)
                if p is not None:
                    self._blocks.free(p.blocks)
                    p.blocks = []
                    failed.append(p)
            self._stats.requests_failed += len(failed)
        if failed:
            log.warning("failing requests %s: %s", [p.id for p in failed], message)
        for batch_id in batch_ids:
            try:
                self.client.clear_cache(batch_id)
            except ShardError as err:
                log.warning("ClearCache(%d) after a failure also failed: %s", batch_id, err)
        for p in failed:
            p.handle._fail(message)

    def _shutdown(self) -> None:
        """On the loop thread at close: fail everything, drop the running batch, refuse commands."""
        with self._cv:
            queued = list(self._queue)
            self._queue.clear()
            commands, self._commands = self._commands, []
        for p in queued:
            p.handle._fail("the router was closed")
        batch_ids = [self._running.id] if self._running is not None else []
        self._running = None
        if batch_ids or self._in_flight:
            self._fail(batch_ids, list(self._in_flight), "the router was closed")
        for cmd in commands:
            cmd.future.set_exception(RuntimeError("the router was closed"))

    def _run_in_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop thread between steps and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        cmd = _Command(fn)
        with self._cv:
            if self._stopping or self._thread is None:
                raise RuntimeError("the router is not running")
            self._commands.append(cmd)
            self._cv.notify_all()
        return cmd.future.result()

    # ------------------------------------------------------------------ commands (loop thread)

    def _health_probe(self) -> bool:
        ids = self.tokenizer.encode("liveness") if self.tokenizer is not None else []
        ok = True
        try:
            self.client.prefill(health_batch(ids, self._use_blocks))
        except ShardError as err:
            log.warning("health probe failed: %s", err)
            ok = False
        try:
            self.client.clear_cache(HEALTH_ID)
        except ShardError as err:
            log.warning("health probe ClearCache failed: %s", err)
        return ok

    def _make_room(self, fraction: float) -> bool:
        """Offload idle adapters (least recently used first) until `fraction` more fits the shards'
        adapter memory budget (the DownloadAdapter fractions of loaded adapters add up to at most 1)."""
        with self._cv:
            busy = {p.request.adapter_index for p in self._in_flight.values()}
            loaded = [a for a in self.adapters.values() if a.loaded]
            used = sum(a.memory_fraction for a in loaded)
            idle = sorted((a for a in loaded if a.index not in busy), key=lambda a: self._adapter_used.get(a.index, 0))
        while used + fraction > 1.0 + 1e-6:
            if not idle:
                return False
            victim = idle.pop(0)
            self.client.offload_adapter(victim.params, victim.source, victim.index)
            victim.loaded = False
            used -= victim.memory_fraction
            log.info("offloaded idle adapter index %d to make room", victim.index)
        return True

    def _reload_head_adapter(self) -> None:
        with self._cv:
            if not self._queue:
                return
            info = self.adapters.get(self._queue[0].request.adapter_index)
            if info is None or info.loaded:
                return
        if self._make_room(info.memory_fraction):
            self.client.load_adapter(info.params, info.source, info.index)
            info.loaded = True

    def _load_adapter(self, params: pb.AdapterParameters, source: int, api_token: str | None,
                      memory_fraction: float) -> int:
        if not self._make_room(memory_fraction):
            raise ValidationError(f"adapter {list(params.adapter_ids)} needs {memory_fraction:.3f} of the adapter "
                                  "memory budget and every loaded adapter is in use")
        index = self._next_adapter_index
        self._next_adapter_index += 1  # burned even if loading fails: indices are never reused
        if not self.client.load_adapter(params, source, index, api_token):
            raise RuntimeError(f"a shard did not load adapter {list(params.adapter_ids)} into index {index}")
        with self._cv:
            self.adapters[index] = AdapterInfo(index, params, source, True, memory_fraction)
        return index

    def _offload_adapter(self, index: int) -> None:
        with self._cv:
            adapter = self.adapters.get(index)
            if adapter is None or not adapter.loaded:
                raise ValidationError(f"adapter index {index} is not loaded")
            users = [p.id for p in (*self._queue, *self._in_flight.values()) if p.request.adapter_index == index]
            if users:
                raise ValidationError(f"adapter index {index} is in use by requests {users}")
            adapter.loaded = False  # no new request may use it from here on
        try:
            self.client.offload_adapter(adapter.params, adapter.source, index)
        except BaseException:
            with self._cv:
                adapter.loaded = True
            raise

    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[str, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValidationError("a text prompt needs a tokenizer: pass tokenizer= to the Router, or token ids")
            return prompt, list(self.tokenizer.encode(prompt))
        ids = [int(i) for i in prompt]
        decode = getattr(self.tokenizer, "decode", None)
        return (decode(ids) if decode is not None else ""), ids

