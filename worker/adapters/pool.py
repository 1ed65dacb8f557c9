"""The adapter manager: the router's adapter_index → pool slot map, LRU eviction of idle adapters, and the
adapter RPCs' bodies, over the slot pool (slots.py), the host copies (staging.py) and the slots' Medusa heads
(medusa_slots.py).

An adapter used by a live batch is never evicted or offloaded. Host copies of offloaded adapters are
kept up to `host_cache` (least recently used dropped first; read from disk again if used); an offloaded
index whose host copy is dropped is forgotten, so indices the router never reuses cannot grow memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.adapters.host import HostAdapter
from worker.adapters.medusa import medusa_only
from worker.adapters.medusa_slots import MedusaSlots
from worker.adapters.merge import merge_adapters
from worker.adapters.peft import LoraAdapter, adapter_dir, read_adapter
from worker.adapters.slots import SlotPool
from worker.adapters.staging import HostCopies
from worker.distributed import ParallelContext
from worker.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from worker.layers.lora import check_lora_decode, lora_kernels
from worker.layers.medusa import MedusaCheckpoint
from worker.models.qwen import FlashQwenForCausalLM
from worker.pb import generate_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One adapter_index: what to read it from, its host copy and its slot."""

    params: Any  # pb.AdapterParameters (kept to reload from disk if the host copy was dropped)
    source: int  # pb.AdapterSource
    host: HostAdapter | None  # the whole adapter on the host (pinned: a slot fills from it directly)
    rank: int
    ranks: torch.Tensor  # [layers, modules] int32: rank per module (0: not targeted)
    slot: int | None = None
    medusa: MedusaCheckpoint | None = None  # its Medusa heads (Medusa-only v2 or joint LoRA + Medusa)
    last_used: float = field(default_factory=time.monotonic)
    offloaded: bool = False  # by OffloadAdapter (not evicted): forgotten when its host copy is dropped


class AdapterManager:
    def __init__(
        self,
        root: str,
        model: FlashQwenForCausalLM,
        pctx: ParallelContext,
        dtype: torch.dtype,
        max_rank: int = 64,
        num_slots: int = 8,
        allow_bin: bool = False,
        host_cache: int = 32,
        triton: bool | None = None,
        overlap: bool = True,
        triton_interpreter: bool = False,
        lora_decode: str = "auto",
        pool_rank: int | None = None,
    ):
        """model: its LoRA targets shape the pool (`attach` wraps them; a model on the meta device gives the
        shapes alone); pctx, dtype: the pool's device and dtype. triton: the Triton LoRA kernels (None: on
        CUDA when Triton imports; False: the PyTorch path); overlap: with the kernels, run each module's
        shrink on a side stream beside its base matmul; lora_decode: serve's --lora-decode (layers.lora.LORA_DECODE);
        pool_rank: the pools' lanes a slot at start (None: slots.START_RANK, at most max_rank), grown to fit larger
        adapters as they load (`_fit_rank`)."""
        if num_slots < 1:
            raise ValueError("the adapter pool needs at least one slot (--max-adapter-slots)")
        self.root = root
        self.config = model.config
        self.pctx = pctx
        self.dtype = dtype
        self.max_rank = max_rank
        self.num_slots = num_slots
        self.allow_bin = allow_bin
        self.host_cache = host_cache
        self.entries: dict[int, Entry] = {}
        self.slot_owner: list[int | None] = [None] * (num_slots + 1)  # slot -> adapter index; slot 0 = base
        self.engine: Any = None
        self.last_timing: dict[str, float] = {}  # phases of the last cold read (logged; read by the benchmark)
        self.preloaded: list[tuple[int, str]] = []
        self.lora_decode = check_lora_decode(lora_decode)
        auto = triton is None and pctx.device.type == "cuda"
        self.kernels = lora_kernels(pctx.device, triton_interpreter) if triton or auto else None
        if triton and self.kernels is None:
            raise ValueError(f"the Triton LoRA kernels need CUDA and triton (device {pctx.device})")
        self.on_cuda = pctx.device.type == "cuda"
        self.shrink_stream = (
            torch.cuda.Stream(pctx.device) if self.kernels is not None and overlap and self.on_cuda else None
        )
        self.slots = SlotPool(model.lora_targets(), pctx, dtype, max_rank, num_slots, pool_rank)
        self.copies = HostCopies(self.slots, self.config, dtype)
        self.medusa = MedusaSlots(root, model)
        log.info(
            "adapter pool: %d slots of max rank %d (%.1f MiB each, %.1f MiB in all; %d lanes a slot until a larger "
            "adapter loads), root %s, LoRA backend %s%s",
            num_slots,
            max_rank,
            self.slots.slot_bytes / 2**20,
            self.slots.slot_bytes * num_slots / 2**20,
            self.slots.rank,
            root,
            "triton" if self.kernels is not None else "torch",
            " (shrink on a side stream)" if self.shrink_stream is not None else "",
        )

    @classmethod
    def from_args(
        cls, args: Any, model: FlashQwenForCausalLM, pctx: ParallelContext, triton_interpreter: bool = False
    ) -> AdapterManager:
        triton = {"auto": None, "torch": False, "triton": True}[getattr(args, "lora_backend", "auto")]
        return cls(
            args.adapter_root,
            model,
            pctx,
            model.dtype,
            args.max_lora_rank,
            args.max_adapter_slots,
            args.allow_bin_adapters,
            triton=triton,
            triton_interpreter=triton_interpreter,
            lora_decode=getattr(args, "lora_decode", "auto"),
            pool_rank=getattr(args, "lora_pool_rank", None),
        )

    # ------------------------------------------------------------------ wiring
    def attach(self, engine: Any) -> None:
        """Wrap the model's LoRA targets and register with the engine."""
        self.engine = engine
        engine.adapters = self
        modes = self.slots.wrap_targets(self.kernels, self.shrink_stream, self.lora_decode)
        described = ", ".join(f"{m} x{n}" for m, n in sorted(modes.items()))
        log.info("LoRA decode modes (--lora-decode %s): %s", self.lora_decode, described)
        if self.lora_decode == "gemm" and set(modes) != {"gemm"}:
            log.warning(
                "--lora-decode gemm: targets without a float weight on the pool's device and dtype (quantized, or "
                "the torch LoRA backend) run another mode: %s",
                described,
            )

    def preload(self, adapter_ids: list[str]) -> None:
        for k, adapter_id in enumerate(adapter_ids, start=1):
            params = pb.AdapterParameters(adapter_ids=[adapter_id])
            self.load(
                pb.LoadAdapterRequest(adapter_parameters=params, adapter_source=pb.AdapterSource.LOCAL, adapter_index=k)
            )
            self.preloaded.append((k, adapter_id))

    def preloaded_pb(self) -> list:
        return [
            pb.PreloadedAdapter(
                adapter_parameters=pb.AdapterParameters(adapter_ids=[aid]),
                adapter_source=pb.AdapterSource.LOCAL,
                adapter_index=k,
            )
            for k, aid in self.preloaded
        ]

    # ------------------------------------------------------------------ reading
    def _read(self, params: Any, source: int, dtype: torch.dtype = torch.float32) -> LoraAdapter:
        """The adapter (merged when several ids are given), in `dtype` when a single one (merges run in fp32)."""
        ids = list(params.adapter_ids)
        if not ids:
            raise InvalidArgument("adapter_parameters.adapter_ids is empty")
        if len(ids) == 1 and medusa_only(adapter_dir(self.root, ids[0], source)):
            return LoraAdapter(0, {})  # Medusa heads alone: an empty slot of LoRA
        adapters = [
            read_adapter(
                adapter_dir(self.root, i, source),
                self.config,
                self.max_rank,
                self.allow_bin,
                dtype if len(ids) == 1 else torch.float32,
            )
            for i in ids
        ]
        if len(adapters) == 1:
            return adapters[0]
        return merge_adapters(
            adapters, list(params.weights), params.merge_strategy, params.density, params.majority_sign_method, seed=0
        )

    def _host_copy(self, params: Any, source: int) -> tuple[HostAdapter, torch.Tensor]:
        """(the whole adapter on the host, its ranks [layers, modules] int32; pinned on CUDA)."""
        t0 = time.perf_counter()
        path = adapter_dir(self.root, params.adapter_ids[0], source) if len(params.adapter_ids) == 1 else None
        if path is not None and medusa_only(path):
            path = None  # read_weights gives its empty LoRA
        host = self.copies.read(path, self.max_rank, lambda: self._read(params, source, self.dtype))
        ranks = self.slots.ranks_of(host)
        self.last_timing = {"read_ms": (time.perf_counter() - t0) * 1e3}
        return host, ranks.pin_memory() if self.on_cuda else ranks  # 1 KB: copied asynchronously

    # ------------------------------------------------------------------ RPC bodies
    def _medusa(self, params: Any, source: int) -> MedusaCheckpoint | None:
        return self.medusa.read(params, source, (e.medusa for e in self.entries.values()))

    def download(self, req: Any) -> Any:
        self._medusa(req.adapter_parameters, req.adapter_source)
        adapter = self._read(req.adapter_parameters, req.adapter_source)
        fraction = 1.0 / self.num_slots  # every adapter takes one fixed-size slot of the budget
        log.info(
            "adapter %s validated: rank %d, %.1f MiB",
            list(req.adapter_parameters.adapter_ids),
            adapter.rank,
            adapter.nbytes / 2**20,
        )
        return pb.DownloadAdapterResponse(downloaded=True, memory_fraction=fraction)

    def load(self, req: Any) -> Any:
        index = req.adapter_index
        if index == 0:
            raise InvalidArgument("adapter_index 0 is the base model and cannot be loaded")
        entry = self.entries.get(index)
        if entry is not None and entry.params != req.adapter_parameters and index in self._in_use():
            raise FailedPrecondition(
                f"adapter index {index} holds another adapter that a live batch uses; "
                "it cannot be replaced until those requests finish"
            )
        fresh = entry is None or entry.params != req.adapter_parameters
        if fresh:
            t0 = time.perf_counter()
            medusa = self._medusa(req.adapter_parameters, req.adapter_source)
            host, ranks = self._host_copy(req.adapter_parameters, req.adapter_source)
            if entry is not None:
                self._free_slot(entry)
            entry = Entry(req.adapter_parameters, req.adapter_source, host, host.rank, ranks, medusa=medusa)
            if medusa is not None:
                log.info("adapter index %d carries %s", index, medusa.describe())
            self.entries[index] = entry
            log.info(
                "adapter index %d (%s) read in %.1f ms (%s)",
                index,
                list(req.adapter_parameters.adapter_ids),
                (time.perf_counter() - t0) * 1e3,
                ", ".join(f"{k} {v:.1f}" for k, v in self.last_timing.items()),
            )
        assert entry is not None
        was_offloaded, entry.offloaded = entry.offloaded, False
        try:
            self._make_resident(index, pinned=set())
        except BaseException:  # a failed load leaves no half-loaded index behind (its slot is zeroed again)
            if fresh:
                del self.entries[index]
            entry.offloaded = was_offloaded
            raise
        return pb.LoadAdapterResponse(loaded=True)

    def offload(self, req: Any) -> Any:
        index = req.adapter_index
        entry = self.entries.get(index)
        if entry is None:
            raise NotFound(f"adapter index {index} is not loaded")
        if index in self._in_use():
            raise FailedPrecondition(f"adapter index {index} is used by a live batch and cannot be offloaded")
        self._free_slot(entry)
        entry.offloaded = True
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
            self.slots.zero(entry.slot)
            self.medusa.detach(entry.slot)
            self.slot_owner[entry.slot] = None
            entry.slot = None

    def _trim_host_cache(self) -> None:
        """Drop host copies of offloaded adapters beyond the cache size, least recently used first, and forget
        the offloaded indices left without one."""
        offloaded = sorted((e.last_used, i) for i, e in self.entries.items() if e.slot is None and e.host is not None)
        self.copies.drop(self.entries[i] for _, i in offloaded[: max(0, len(offloaded) - self.host_cache)])
        for i in [i for i, e in self.entries.items() if e.offloaded and e.host is None]:
            del self.entries[i]

    def _make_resident(self, index: int, pinned: set[int]) -> int:
        entry = self.entries[index]
        entry.last_used = time.monotonic()
        if entry.slot is not None:
            return entry.slot
        free = [s for s in range(1, self.num_slots + 1) if self.slot_owner[s] is None]
        if not free:
            busy = self._in_use() | pinned
            idle = sorted(
                (self.entries[i].last_used, i, s)
                for s, i in enumerate(self.slot_owner)
                if s and i is not None and i not in busy
            )
            if not idle:
                raise ResourceExhausted(
                    f"all {self.num_slots} adapter slots are used by live requests; raise --max-adapter-slots or wait"
                )
            _, victim, victim_slot = idle[0]
            log.info("evicting idle adapter index %d from slot %d", victim, victim_slot)
            free = [victim_slot]
            self._free_slot(self.entries[victim])
        slot = free[0]
        if entry.host is None:  # dropped from the host cache: read again
            entry.host, entry.ranks = self._host_copy(entry.params, entry.source)
        self._fit_rank(entry.rank)
        self.last_timing.update(self.copies.fill(slot, entry, entry.ranks))
        self.slot_owner[slot] = index
        entry.slot = slot
        try:
            self.medusa.attach(entry.medusa, slot)
        except BaseException:  # freed again, so zeroed: free slots hold zeros (the "gemm" kernels read every lane)
            self._free_slot(entry)
            raise
        self._trim_host_cache()
        return slot

    def _fit_rank(self, rank: int) -> None:
        """Give the pools enough lanes a slot for an adapter of `rank` (SlotPool.rank_for): after the steps in flight
        (a look-ahead reads the old views), re-lay them out and have the engine capture its decode graphs with
        adapters again. Logged, with the time it took (a LoadAdapter that grows the pools waits for it)."""
        r, old = self.slots.rank_for(rank), self.slots.rank
        if r == old:
            return
        t0 = time.perf_counter()
        self.copies.wait_pinned()  # no pinned allocation in another thread while the graphs are captured
        if self.on_cuda:
            torch.cuda.synchronize(self.pctx.device)
        self.slots.set_rank(r)
        changed = getattr(self.engine, "adapter_pool_changed", None)
        graphs = changed() if changed is not None else 0
        log.info(
            "adapter pools re-laid out at %d lanes a slot (were %d) for a rank-%d adapter%s in %.0f ms",
            r,
            old,
            rank,
            f", {graphs} decode graphs with adapters captured again," if graphs else "",
            (time.perf_counter() - t0) * 1e3,
        )

    def wait_pinned(self) -> None:
        """Block until the queued host copies are pinned (before CUDA-graph capture, which forbids another
        thread's pinned allocation; tests; benchmarks). A failed one was logged and is not raised here."""
        self.copies.wait_pinned()

    def request_slots(self, batch: Any) -> list[int] | None:
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
        return {
            "adapters_known": len(self.entries),
            "adapter_slots_used": sum(o is not None for o in self.slot_owner[1:]),
            "adapter_slots_total": self.num_slots,
            "adapter_pool_lanes": self.slots.rank,  # lanes a slot: grows with the largest rank loaded
            "adapter_host_bytes": host,
        }
