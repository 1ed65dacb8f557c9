"""P6 of scripts/bench.py (`--only load`, and with `--only lora`): LoadAdapter latency from local
safetensors, cold, after DownloadAdapter and from the host cache."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported by bench.py before bench_common has put the repository on sys.path
    from worker.config import QwenConfig
    from worker.distributed import ParallelContext


def write_peft_adapter(path: str, config: QwenConfig, rank: int, alpha: float, dtype: torch.dtype, seed: int) -> int:
    """A PEFT LoRA adapter directory (all five modules of every layer); returns the file's size."""
    from safetensors.torch import save_file

    from make_demo_model import write_peft_config
    from worker.adapters.peft import MODULES, module_dims

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in MODULES:
            d_in, d_out = module_dims(config, module)
            prefix = f"base_model.model.transformer.h.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * d_in**-0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.02).to(dtype)
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, "adapter_model.safetensors")
    save_file(tensors, file)
    write_peft_config(path, rank, alpha)
    return os.path.getsize(file)


def drop_page_cache(path: str) -> bool:
    """Ask the kernel to drop a file's cached pages (best effort: clean pages of a file we wrote)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def bench_lora_load(
    config: QwenConfig, pctx: ParallelContext, root: str, rank: int, max_rank: int, repeats: int, file_dtypes: list[str]
) -> list[dict[str, Any]]:
    """P6: LoadAdapter (read, validate, fold the scale, stage in pinned memory, fill a slot; synchronized)
    of a rank-`rank` adapter on all five modules: cold (first read of each file, its pages dropped from
    the page cache first), after a DownloadAdapter of it (the router's order: the file's pages are
    cached by then) and from the host cache (reload after offload). Medians, one row per file dtype."""
    from worker.distributed import ParallelContext
    from worker.models.qwen import FlashQwenForCausalLM

    shapes = FlashQwenForCausalLM(config, ParallelContext(pctx.rank, pctx.world_size, torch.device("meta")))
    rows = []
    for name in file_dtypes:
        rows.append(load_latency(name, config, shapes, pctx, root, rank, max_rank, repeats))
        torch.cuda.empty_cache()
    return rows


def load_latency(
    name: str, config: QwenConfig, shapes: Any, pctx: ParallelContext, root: str, rank: int, max_rank: int, repeats: int
) -> dict[str, Any]:
    """bench_lora_load's row for adapter files of dtype `name` (bf16, fp16 or fp32)."""
    from worker.adapters.pool import AdapterManager
    from worker.pb import generate_pb2 as pb

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    mgr = AdapterManager(root, shapes, pctx, torch.bfloat16, max_rank, num_slots=2)
    host_copy, host_s = mgr._host_copy, []
    phases: list[dict[str, float]] = []

    def timed_host_copy(*a: Any, **kw: Any) -> Any:  # the read + validate + scale + pinned staging of a cold load
        t = time.perf_counter()
        out = host_copy(*a, **kw)
        host_s.append(time.perf_counter() - t)
        return out

    mgr._host_copy = timed_host_copy  # type: ignore[method-assign]
    size = 0
    for i in range(repeats + 1):  # adapter 0 warms the code paths up
        size = write_peft_adapter(os.path.join(root, f"{name}-{i}"), config, rank, 2.0 * rank, dtype, seed=i)

    def load(index: int, adapter_id: str) -> float:
        req = pb.LoadAdapterRequest(
            adapter_parameters=pb.AdapterParameters(adapter_ids=[adapter_id]),
            adapter_source=pb.AdapterSource.LOCAL,
            adapter_index=index,
        )
        torch.cuda.synchronize()
        t = time.perf_counter()
        mgr.load(req)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def offload(index: int) -> None:
        mgr.offload(pb.OffloadAdapterRequest(adapter_index=index))

    cold, warm, dropped = [], [], True
    for i in range(repeats + 1):
        dropped &= drop_page_cache(os.path.join(root, f"{name}-{i}", "adapter_model.safetensors"))
        t = load(i + 1, f"{name}-{i}")
        phases.append(dict(mgr.last_timing))
        mgr.wait_pinned()  # loads spaced out: the background pinning of the last one is done
        offload(i + 1)
        if i:
            cold.append(t)
    for i in range(repeats):
        warm.append(load(i + 2, f"{name}-{i + 1}"))
        offload(i + 2)
    after_download = []  # the router's order: DownloadAdapter (reads and validates), then LoadAdapter
    for i in range(repeats):
        adapter_id = f"{name}-{i + 1}"
        drop_page_cache(os.path.join(root, adapter_id, "adapter_model.safetensors"))
        mgr.download(
            pb.DownloadAdapterRequest(
                adapter_parameters=pb.AdapterParameters(adapter_ids=[adapter_id]), adapter_source=pb.AdapterSource.LOCAL
            )
        )
        after_download.append(load(100 + i, adapter_id))  # a new index: read from the file again
        mgr.wait_pinned()
        offload(100 + i)
    after_download.sort()
    cold.sort()
    warm.sort()
    read = sorted(host_s[1:])
    return dict(
        file_dtype=name,
        file_MB=size / 1e6,
        rank=rank,
        max_rank=max_rank,
        repeats=repeats,
        page_cache_dropped=dropped,
        cold_ms=cold[len(cold) // 2] * 1e3,
        cold_read_stage_ms=read[len(read) // 2] * 1e3,
        cached_ms=warm[len(warm) // 2] * 1e3,
        cold_phases_ms=phases[1:],
        after_download_ms=after_download[len(after_download) // 2] * 1e3,
        after_download_all_ms=[t * 1e3 for t in after_download],
        cold_all_ms=[t * 1e3 for t in cold],
        cached_all_ms=[t * 1e3 for t in warm],
    )
