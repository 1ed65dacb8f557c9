"""The adapter slot pool: fixed-shape per-module slots, the router's adapter_index → slot map, LRU
eviction of idle adapters, a host copy for fast reloads, and the adapter RPCs' bodies.

Slot 0 is the base model (zeros). Slots never change shape, so decode can be captured in a CUDA
graph. An adapter used by a live batch is never evicted or offloaded. w2 and w1 of a layer share one
stacked pool (the merged gate_up's two parts, one kernel launch); `ranks[slot, layer, module]` holds
each slot's true rank per module (0: empty), which bounds the kernels' work.

The host copy of an adapter (a HostAdapter: the whole adapter's bytes, as in its file when it was read
straight from safetensors) is kept, so a reload after offload reads nothing from disk; a slot fill
shards it for this rank and folds the scale into B on the slot's device. On CUDA, a cold load reads
the file's data section straight into one pinned staging buffer (allocated once with the pool, the
size of a whole adapter at the maximum rank in the pool dtype): no CPU pass over the values, and
page-locking memory (about 1 ms per MB on an H200 host) is never waited for. A background thread then
folds the scale in and stores the adapter in the pool dtype in pinned memory of the entry's own, from
which a later reload is one asynchronous copy per tensor; a load that needs the staging buffer before
that first keeps a pageable copy of the bytes left there.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from worker.adapters.merge import merge_adapters
from worker.adapters.peft import (HostAdapter, LoraAdapter, module_dims, read_adapter, read_adapter_bytes,
                                  resolve_adapter_dir, shard_lora)
from worker.config import QwenConfig
from worker.distributed import ParallelContext, bind_thread, resolve_device
from worker.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from worker.layers.lora import LoraColumnParallelLinear, LoraRowParallelLinear, LoraTerm, lora_kernels
from worker.pb import generate_pb2 as pb

log = logging.getLogger(__name__)
LOCAL = 2  # proto AdapterSource.LOCAL
POOL_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.w2", "mlp.w1", "mlp.c_proj")  # ranks' module axis (w2, w1 adjacent)


@dataclass
class Entry:
    params: Any  # pb.AdapterParameters (kept to reload from disk if the host copy was dropped)
    source: int
    slot: Optional[int] = None
    host: Optional[HostAdapter] = None  # the whole adapter on the host (pinned: a slot fills from it directly)
    rank: int = 0
    ranks: Optional[torch.Tensor] = None  # [layers, len(POOL_MODULES)] int32: rank per module (0: not targeted)
    last_used: float = field(default_factory=time.monotonic)


class AdapterManager:
    def __init__(self, root: str, config: QwenConfig, pctx: ParallelContext, dtype: torch.dtype, max_rank: int = 64,
                 num_slots: int = 8, allow_bin: bool = False, host_cache: int = 32, triton: Optional[bool] = None,
                 overlap: bool = True, triton_interpreter: bool = False):
        """triton: the Triton LoRA kernels (None: on CUDA when Triton imports; False: the PyTorch path);
        overlap: with the kernels, run each module's shrink on a side stream alongside its base matmul."""
        if num_slots < 1:
            raise ValueError("the adapter pool needs at least one slot (--max-adapter-slots)")
        self.root = root
        self.config = config
        self.pctx = pctx
        self.dtype = dtype
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.allow_bin = allow_bin
        self.host_cache = host_cache
        self.entries: dict[int, Entry] = {}
        self.slot_owner: list[Optional[int]] = [None] * (num_slots + 1)  # slot -> adapter index; slot 0 = base
        self.engine: Any = None
        self.last_timing: dict[str, float] = {}  # phases of the last cold read (logged; read by the benchmark)
        self.preloaded: list[tuple[int, str]] = []
        auto = triton is None and pctx.device.type == "cuda"
        self.kernels = lora_kernels(pctx.device, triton_interpreter) if triton or auto else None
        if triton and self.kernels is None:
            raise ValueError(f"the Triton LoRA kernels need CUDA and triton (device {pctx.device})")
        self.on_cuda = pctx.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(pctx.device) if self.on_cuda else None
        self.shrink_stream = (torch.cuda.Stream(pctx.device) if self.kernels is not None and overlap and self.on_cuda
                              else None)
        # stacked pools, one per (layer, module group): A [slots, P, r_max, in], B [slots, P, out/P, r_max]
        self.stacked: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pools: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # per module: views of one part
        self.ranks = torch.zeros(num_slots + 1, config.num_hidden_layers, len(POOL_MODULES), dtype=torch.int32,
                                 device=pctx.device)
        n = pctx.world_size
        for layer in range(config.num_hidden_layers):
            for group, modules in (("attn.c_attn", ["attn.c_attn"]), ("attn.c_proj", ["attn.c_proj"]),
                                   ("mlp.gate_up", ["mlp.w2", "mlp.w1"]), ("mlp.c_proj", ["mlp.c_proj"])):
                d_in, d_out = module_dims(config, modules[0])
                if group in ("attn.c_proj", "mlp.c_proj"):
                    d_in //= n
                else:
                    d_out //= n
                P = len(modules)
                a = torch.zeros(num_slots + 1, P, max_rank, d_in, dtype=dtype, device=pctx.device)
                b = torch.zeros(num_slots + 1, P, d_out, max_rank, dtype=dtype, device=pctx.device)
                self.stacked[(layer, group)] = (a, b)
                for p, module in enumerate(modules):
                    self.pools[(layer, module)] = (a[:, p], b[:, p])
        self.slot_bytes = sum(a[0].numel() * a.element_size() + b[0].numel() * b.element_size()
                              for a, b in self.stacked.values())
        self.staging: Optional[torch.Tensor] = None  # pinned uint8, a whole adapter at max rank (CUDA only)
        self.staging_done: Optional[torch.cuda.Event] = None  # the last copy out of it
        self.staging_holder: Optional[weakref.ref] = None  # a HostAdapter whose only bytes are in staging
        self.staging_lock = threading.Lock()
        self.pinner: Optional[concurrent.futures.ThreadPoolExecutor] = None  # pins host copies off the load path
        self.pinning: list[concurrent.futures.Future] = []
        if self.on_cuda:
            self.pinner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-pin",
                                                                initializer=bind_thread,
                                                                initargs=(resolve_device(pctx.device),))
            t0 = time.perf_counter()
            full = sum(max_rank * sum(module_dims(config, m)) for m in POOL_MODULES) * config.num_hidden_layers
            self.staging = torch.empty(full * dtype.itemsize, dtype=torch.uint8, pin_memory=True)
            log.info("adapter staging buffer: %.1f MiB pinned in %.0f ms", self.staging.numel() / 2**20,
                     (time.perf_counter() - t0) * 1e3)
        log.info("adapter pool: %d slots of max rank %d (%.1f MiB each, %.1f MiB in all), root %s, LoRA backend %s%s",
                 num_slots, max_rank, self.slot_bytes / 2**20, self.slot_bytes * num_slots / 2**20, root,
                 "triton" if self.kernels is not None else "torch",
                 " (shrink on a side stream)" if self.shrink_stream is not None else "")

    @classmethod
    def from_args(cls, args: Any, model: Any, pctx: ParallelContext,
                  triton_interpreter: bool = False) -> "AdapterManager":
        triton = {"auto": None, "torch": False, "triton": True}[getattr(args, "lora_backend", "auto")]
        return cls(args.adapter_root, model.config, pctx, model.dtype, args.max_lora_rank, args.max_adapter_slots,
                   args.allow_bin_adapters, triton=triton, triton_interpreter=triton_interpreter)

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: Any) -> None:
        """Wrap the model's target linears and register with the engine."""
        self.engine = engine
        engine.adapters = self
        model = engine.model
        for i, layer in enumerate(model.transformer.h):
            attn, mlp = layer.attn, layer.mlp

            def term(group: str, first: str, parts: int = 1) -> LoraTerm:
                k = POOL_MODULES.index(first)
                return LoraTerm(*self.stacked[(i, group)], self.ranks[:, i, k:k + parts].t(),  # ranks [P, slots]
                                self.kernels, self.shrink_stream)

            attn.c_attn = LoraColumnParallelLinear(attn.c_attn, term("attn.c_attn", "attn.c_attn"))
            attn.c_proj = LoraRowParallelLinear(attn.c_proj, term("attn.c_proj", "attn.c_proj"))
            mlp.gate_up = LoraColumnParallelLinear(mlp.gate_up, term("mlp.gate_up", "mlp.w2", 2))  # w2 | w1
            mlp.c_proj = LoraRowParallelLinear(mlp.c_proj, term("mlp.c_proj", "mlp.c_proj"))

    def preload(self, adapter_ids: list[str]) -> None:
        for k, adapter_id in enumerate(adapter_ids, start=1):
            params = pb.AdapterParameters(adapter_ids=[adapter_id])
            self.load(pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=LOCAL, adapter_index=k))
            self.preloaded.append((k, adapter_id))

    def preloaded_pb(self) -> list:
        return [pb.PreloadedAdapter(adapter_parameters=pb.AdapterParameters(adapter_ids=[aid]), adapter_source=LOCAL,
                                    adapter_index=k) for k, aid in self.preloaded]

    # ------------------------------------------------------------------ reading
    def _path(self, adapter_id: str, source: int) -> str:
        try:
            return resolve_adapter_dir(self.root, adapter_id)
        except NotFound:
            if source != LOCAL:
                raise FailedPrecondition(
                    f"adapter {adapter_id!r}: source {pb.AdapterSource.Name(source)} needs network access, "
                    f"which this worker does not have, and no local copy is under {self.root}") from None
            raise

    def _read(self, params: Any, source: int, dtype: torch.dtype = torch.float32) -> LoraAdapter:
        """The adapter (merged when several ids are given), in `dtype` when a single one (merges run in fp32)."""
        ids = list(params.adapter_ids)
        if not ids:
            raise InvalidArgument("adapter_parameters.adapter_ids is empty")
        adapters = [read_adapter(self._path(i, source), self.config, self.max_rank, self.allow_bin,
                                 dtype if len(ids) == 1 else torch.float32) for i in ids]
        if len(adapters) == 1:
            return adapters[0]
        return merge_adapters(adapters, list(params.weights), params.merge_strategy, params.density,
                              params.majority_sign_method, seed=0)

    def _host_copy(self, params: Any, source: int) -> tuple[HostAdapter, torch.Tensor]:
        """(the whole adapter on the host, this rank's ranks [layers, modules] int32). A single safetensors
        adapter is read as its file's bytes (on CUDA straight into the pinned staging buffer); merges,
        .bin files and files that do not fit go through read_adapter and are kept in the pool dtype (so
        they fit the staging buffer: it holds a whole adapter at the maximum rank in that dtype)."""
        t0 = time.perf_counter()
        host = None
        if len(params.adapter_ids) == 1:
            path = self._path(params.adapter_ids[0], source)
            if self.on_cuda:
                with self.staging_lock:
                    host = read_adapter_bytes(path, self.config, self.max_rank, self._claim_staging)
                    if host is not None:
                        self.staging_holder = weakref.ref(host)
            else:
                host = read_adapter_bytes(path, self.config, self.max_rank, _pageable)
        if host is None:
            adapter = self._read(params, source, self.dtype)  # a merge comes in fp32: rounded once here
            host = HostAdapter.from_weights(LoraAdapter(adapter.rank, {
                key: (a.to(self.dtype), b.to(self.dtype)) for key, (a, b) in adapter.weights.items()}))
        ranks = torch.zeros(self.config.num_hidden_layers, len(POOL_MODULES), dtype=torch.int32)
        for layer, module in host.layout:
            ranks[layer, POOL_MODULES.index(module)] = host.rank
        self.last_timing = {"read_ms": (time.perf_counter() - t0) * 1e3}
        return host, ranks.pin_memory() if self.on_cuda else ranks  # 1 KB: copied asynchronously

    def _claim_staging(self, nbytes: int) -> Optional[torch.Tensor]:
        """The staging buffer's first `nbytes` (None: they do not fit), once the copies out of it are done
        and the bytes it held for an adapter without a copy of its own were copied out. Under staging_lock."""
        if nbytes > self.staging.numel():
            return None
        holder = self.staging_holder() if self.staging_holder is not None else None
        if holder is not None and holder.buf.data_ptr() == self.staging.data_ptr():
            holder.buf = holder.buf.clone()  # pageable; the pinning thread pins it later
        self.staging_holder = None
        if self.staging_done is not None:
            self.staging_done.synchronize()
        return self.staging[:nbytes]

    # ------------------------------------------------------------------ RPC bodies
    def download(self, req: Any) -> Any:
        adapter = self._read(req.adapter_parameters, req.adapter_source)
        fraction = 1.0 / self.num_slots  # every adapter takes one fixed-size slot of the budget
        log.info("adapter %s validated: rank %d, %.1f MiB", list(req.adapter_parameters.adapter_ids), adapter.rank,
                 adapter.nbytes / 2**20)
        return pb.DownloadAdapterResponse(downloaded=True, memory_fraction=fraction)

    def load(self, req: Any) -> Any:
        index = req.adapter_index
        if index == 0:
            raise InvalidArgument("adapter_index 0 is the base model and cannot be loaded")
        entry = self.entries.get(index)
        if entry is not None and entry.params != req.adapter_parameters and index in self._in_use():
            raise FailedPrecondition(f"adapter index {index} holds another adapter that a live batch uses; "
                                     "it cannot be replaced until those requests finish")
        if entry is None or entry.params != req.adapter_parameters:
            t0 = time.perf_counter()
            host, ranks = self._host_copy(req.adapter_parameters, req.adapter_source)
            if entry is not None:
                self._free_slot(entry)
            entry = Entry(req.adapter_parameters, req.adapter_source, host=host, rank=host.rank, ranks=ranks)
            self.entries[index] = entry
            log.info("adapter index %d (%s) read in %.1f ms (%s)", index, list(req.adapter_parameters.adapter_ids),
                     (time.perf_counter() - t0) * 1e3, ", ".join(f"{k} {v:.1f}" for k, v in self.last_timing.items()))
        self._make_resident(index, pinned=set())
        return pb.LoadAdapterResponse(loaded=True)

    def offload(self, req: Any) -> Any:
        index = req.adapter_index
        entry = self.entries.get(index)
        if entry is None:
            raise NotFound(f"adapter index {index} is not loaded")
        if index in self._in_use():
            raise FailedPrecondition(f"adapter index {index} is used by a live batch and cannot be offloaded")
        self._free_slot(entry)
        self._trim_host_cache()
        return pb.OffloadAdapterResponse(offloaded=True)

    # ------------------------------------------------------------------ slots
    def has(self, index: int) -> bool:
        return index in self.entries

    def _in_use(self) -> set[int]:
        if self.engine is None:
            return set()
        return {r.adapter_index for b in self.engine.batches.values() for r in b.requests if r.adapter_index}

    def _free_slot(self, entry: Entry) -> None:
        if entry.slot is not None:
            for a_pool, b_pool in self.stacked.values():
                a_pool[entry.slot].zero_()
                b_pool[entry.slot].zero_()
            self.ranks[entry.slot].zero_()
            self.slot_owner[entry.slot] = None
            entry.slot = None

    def _trim_host_cache(self) -> None:
        """Drop host copies of offloaded adapters beyond the cache size (least recently used first);
        they are read from disk again if used."""
        offloaded = sorted((e.last_used, i) for i, e in self.entries.items() if e.slot is None and e.host is not None)
        with self.staging_lock:  # the pinning thread swaps host copies under it
            for _, i in offloaded[: max(0, len(offloaded) - self.host_cache)]:
                self.entries[i].host = None

    def _make_resident(self, index: int, pinned: set[int]) -> int:
        entry = self.entries[index]
        entry.last_used = time.monotonic()
        if entry.slot is not None:
            return entry.slot
        free = [s for s in range(1, self.num_slots + 1) if self.slot_owner[s] is None]
        if not free:
            busy = self._in_use() | pinned
            idle = sorted((self.entries[i].last_used, i) for i in self.slot_owner[1:] if i is not None and i not in busy)
            if not idle:
                raise ResourceExhausted(f"all {self.num_slots} adapter slots are used by live requests; "
                                        "raise --max-adapter-slots or wait")
            victim = self.entries[idle[0][1]]
            log.info("evicting idle adapter index %d from slot %d", idle[0][1], victim.slot)
            free = [victim.slot]
            self._free_slot(victim)
        slot = free[0]
        if entry.host is None:  # dropped from the host cache: read again
            entry.host, entry.ranks = self._host_copy(entry.params, entry.source)
        self._fill(slot, entry)
        self.slot_owner[slot] = index
        entry.slot = slot
        self._trim_host_cache()
        return slot

    def _fill(self, slot: int, entry: Entry) -> None:
        """Copy the entry's adapter (this rank's shard, scale folded into B) and ranks into `slot` (all zeros).
        On CUDA: on a side stream ordered after the main stream's work so far (the zeroing, steps still
        reading the slot), with the main stream's later work ordered after the copies; straight from a
        pinned host copy or from the staging buffer the cold read left the bytes in, else from the staging
        buffer after one copy into it; an unpinned host copy is then queued for pinning. A fill that fails
        part-way leaves the slot zeroed again."""
        host = entry.host
        if self.staging is None:
            try:
                self._copy_into(slot, host, host.buf, entry.ranks, non_blocking=False)
            except BaseException:
                self._zero_slot(slot)
                raise
            return
        with self.staging_lock:
            t0 = time.perf_counter()
            staged = not host.pinned  # read together with buf: the pinning thread swaps both
            src = host.buf
            if staged and host.buf.data_ptr() != self.staging.data_ptr():
                claimed = self._claim_staging(host.nbytes)  # None: too big (never, by _host_copy's dtypes)
                src = host.buf if claimed is None else claimed.copy_(host.buf)  # pageable: synchronous copies
            t1 = time.perf_counter()
            main = torch.cuda.current_stream(self.pctx.device)
            self.copy_stream.wait_stream(main)
            try:
                with torch.cuda.stream(self.copy_stream):
                    self._copy_into(slot, host, src, entry.ranks, non_blocking=True)  # src and ranks are pinned
            except BaseException:
                main.wait_stream(self.copy_stream)
                self._zero_slot(slot)  # on the main stream, after whatever copies were queued
                raise
            finally:
                if src.data_ptr() == self.staging.data_ptr():  # staging is not reused before these copies end
                    self.staging_done = torch.cuda.Event()
                    self.staging_done.record(self.copy_stream)
            main.wait_stream(self.copy_stream)
            self.last_timing.update(stage_ms=(t1 - t0) * 1e3, issue_ms=(time.perf_counter() - t1) * 1e3)
        if staged and self.pinner is not None:
            future = self.pinner.submit(self._pin, entry, host)
            future.add_done_callback(_log_pin_failure)
            self.pinning = [f for f in self.pinning if not f.done()] + [future]

    def _zero_slot(self, slot: int) -> None:
        for a_pool, b_pool in self.stacked.values():
            a_pool[slot].zero_()
            b_pool[slot].zero_()
        self.ranks[slot].zero_()

    def _copy_into(self, slot: int, host: HostAdapter, src: torch.Tensor, ranks: torch.Tensor,
                   non_blocking: bool) -> None:
        """Each module's (A, B) of rank r, laid out in `src` as in `host`, into the slot's first r lanes:
        this rank's shard, B times the host's scale (in fp32, rounded once to the pool dtype, as
        read_adapter does); then the slot's ranks."""
        dev, world, r = self.pctx.device, self.pctx.world_size, host.rank
        for key, (a, b) in host.tensors(src).items():
            a_pool, b_pool = self.pools[key]
            dst_a, dst_b = a_pool[slot, :r], b_pool[slot, :, :r]
            if world > 1 and not host.cut:  # whole tensors over, cut on the device (c_attn's B per q/k/v)
                a, b = self._cut(key, a.to(dev, non_blocking=non_blocking), b.to(dev, non_blocking=non_blocking))
            dst_a.copy_(a, non_blocking=non_blocking)
            if host.scale == 1.0:
                dst_b.copy_(b, non_blocking=non_blocking)
            elif self.on_cuda and b.dtype == dst_b.dtype:  # the kernel multiplies in fp32 and rounds once
                dst_b.copy_(b, non_blocking=non_blocking).mul_(host.scale)
            else:
                dst_b.copy_(b.to(dev, non_blocking=non_blocking).float() * host.scale)  # never b itself
        self.ranks[slot].copy_(ranks, non_blocking=non_blocking)

    def _cut(self, key: tuple[int, str], a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's shard of a module's (A, B)."""
        return shard_lora(key[1], a, b, self.config, self.pctx.rank, self.pctx.world_size)

    def _pin(self, entry: Entry, host: HostAdapter) -> None:
        """Background: a host copy in pinned memory of its own, with read_adapter's values in the pool dtype
        and only this rank's shard (a reload is then plain copies); swapped in unless the entry moved on
        meanwhile. Bytes still in the staging buffer are read under its lock (a load would reuse it)."""
        cut = self._cut if self.pctx.world_size > 1 and not host.cut else None
        weights = None
        with self.staging_lock:
            if entry.host is not host or host.pinned:
                return
            if host.buf.data_ptr() == self.staging.data_ptr():
                weights = host.folded(self.dtype, cut)
        if weights is None:  # its own pageable bytes: nothing else writes them
            weights = host.folded(self.dtype, cut)
        pinned = HostAdapter.from_weights(weights, lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True),
                                          cut=cut is not None or host.cut)
        with self.staging_lock:
            if entry.host is host:
                entry.host = pinned
            if self.staging_holder is not None and self.staging_holder() is host:
                self.staging_holder = None  # replaced: nothing to keep from the staging buffer

    def wait_pinned(self) -> None:
        """Block until the queued host copies are pinned (before CUDA-graph capture, which forbids another
        thread's pinned allocation; tests; benchmarks). A failed one was logged and is not raised here."""
        concurrent.futures.wait(self.pinning)
        self.pinning = []

    def request_slots(self, batch: Any) -> Optional[list[int]]:
        """The pool slot of each request's adapter (0: base model), loading idle ones back if needed;
        None when no request of the batch uses an adapter."""
        indices = [r.adapter_index for r in batch.requests]
        wanted = {i for i in indices if i}
        if not wanted:
            return None
        slots = {i: self._make_resident(i, pinned=wanted) for i in sorted(wanted)}
        return [slots.get(i, 0) for i in indices]

    def stats(self) -> dict[str, int]:
        host = sum(e.host.nbytes for e in self.entries.values() if e.host is not None)
        return {"adapters_known": len(self.entries),
                "adapter_slots_used": sum(o is not None for o in self.slot_owner[1:]),
                "adapter_slots_total": self.num_slots, "adapter_host_bytes": host}


def _log_pin_failure(future: concurrent.futures.Future) -> None:
    if future.exception() is not None:  # the slot was filled already: only reloads stay on the staged path
        log.warning("pinning an adapter's host copy failed: %r", future.exception())


def _pageable(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def default_root_check(root: str) -> str:
    if not os.path.isdir(root):
        raise ValueError(f"--adapter-root {root} is not a directory")
    return root
