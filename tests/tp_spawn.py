"""Runs one script as every rank of a tensor-parallel group, torchrun-style: one process per rank with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its env (gloo on a CPU; NCCL when the script picks cuda). Each
rank writes OUT-{rank}.safetensors, which the caller gets back in rank order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

import torch
from safetensors.torch import load_file

from worker.launcher import free_port


def run_ranks(argv: Sequence[str], out: str, world: int, **env_extra: str) -> list[dict[str, torch.Tensor]]:
    """`python *argv` as ranks 0..world-1 on a free port; each must exit 0 (else its output's tail fails
    the test) within QWEN_TP_SPAWN_TIMEOUT seconds (180). A rank past it is sent SIGABRT, so faulthandler
    writes every thread's stack into the output the failure shows (a hang says where it hangs)."""
    timeout = float(os.environ.get("QWEN_TP_SPAWN_TIMEOUT", "180"))
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONFAULTHANDLER="1",
            **env_extra,
        )
        cmd = [sys.executable, *argv]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        try:
            output, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGABRT)
            output, _ = p.communicate()
            raise AssertionError(f"rank timed out after {timeout:.0f} s:\n" + output.decode()[-6000:]) from None
        assert p.returncode == 0, output.decode()[-3000:]
    return [load_file(f"{out}-{r}.safetensors") for r in range(world)]
