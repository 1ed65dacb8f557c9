"""ParallelContext: rank, world size, process group and device, built once and passed to constructors.

World size 1 runs no collective at all. Built from the torchrun environment (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) by the CLI, never read inside layers.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: dist.ProcessGroup | None = None  # set when world_size > 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over ranks in place (identity at world size 1)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise max of `x` over ranks in place (identity at world size 1)."""
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's `x` along the last dim, in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


def init_from_env(env: Mapping[str, str], device: str = "auto", timeout_s: float = 600.0) -> ParallelContext:
    """Build the context from torchrun variables; initialise NCCL (CUDA) or gloo (CPU) when world_size > 1."""
    rank = int(env.get("RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
        dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world_size == 1:
        return ParallelContext(0, 1, dev, None)
    addr = env.get("MASTER_ADDR", "localhost")
    port = env.get("MASTER_PORT", "29500")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=dev if dev.type == "cuda" else None,
    )
    return ParallelContext(rank, world_size, dev, dist.group.WORLD)


def resolve_device(device: torch.device) -> torch.device:
    """`device` with its index made explicit: a bare `cuda` means the calling thread's current device,
    which a helper thread would otherwise read as cuda:0. Resolve in the thread that owns the device,
    before handing it to another thread's `bind_thread`."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def bind_thread(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (no-op elsewhere). The current device is
    per thread: a gRPC worker thread or a helper thread starts on cuda:0, where Triton refuses the
    pointers of shard r's tensors on cuda:r ("cannot be accessed from Triton") and a pinned allocation
    would open a second CUDA context. Every thread of a shard that touches CUDA starts here, with a device
    `resolve_device` gave in the owning thread (a bare `cuda` here would be this thread's cuda:0)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def shutdown(ctx: ParallelContext) -> None:
    """Leave the process group together (a barrier first: gloo aborts if a peer vanishes mid-teardown). CUDA graphs
    that captured NCCL collectives must be gone first: destroy_process_group hangs while one lives (two H200s,
    graphs kept alive by a reference cycle), so unreachable ones are collected and the device drained here."""
    if ctx.world_size > 1 and dist.is_initialized():
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        try:
            dist.barrier(group=ctx.group)
        finally:
            dist.destroy_process_group()


def env_snapshot() -> dict[str, str]:
    """The torchrun variables of this process (read once, by the CLI)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: os.environ[k] for k in keys if k in os.environ}
