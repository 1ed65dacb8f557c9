"""Every gRPC worker thread of a shard runs on the shard's CUDA device (the current device is per
thread: without this, rank r's RPCs ran with cuda:0 current and Triton refused its tensors on cuda:r)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from types import SimpleNamespace

import grpc
import torch

from worker.pb import generate_pb2 as pb
from worker.pb import generate_pb2_grpc as pb_grpc
from worker.server import LoraxServicer, make_server


def test_rpc_threads_bind_the_shard_device(monkeypatch):
    bound = []
    monkeypatch.setattr(
        torch.cuda,
        "set_device",
        lambda d: bound.append((threading.current_thread() is threading.main_thread(), str(d))),
    )
    engine = SimpleNamespace(
        pctx=SimpleNamespace(device=torch.device("cuda", 1)),
        model=SimpleNamespace(dtype=torch.bfloat16),
        cfg=SimpleNamespace(block_size=16, chunked_prefill=True),
        speculation=SimpleNamespace(tokens=0),  # Info.speculate
    )
    d = tempfile.mkdtemp(prefix="qt", dir="/tmp")
    path = os.path.join(d, "s-1")
    server = make_server(LoraxServicer(engine, os.path.join(d, "s"), "cuda"), path)
    try:
        with grpc.insecure_channel(f"unix://{path}") as channel:
            info = pb_grpc.LoraxServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert info.block_size == 16 and info.device_type == "cuda"
        assert bound and all(not main and dev == "cuda:1" for main, dev in bound)  # worker threads, cuda:1
    finally:
        server.stop(None)
        shutil.rmtree(d, ignore_errors=True)


def test_bare_cuda_device_binds_the_owning_threads_device(monkeypatch):
    """A shard built on plain `cuda` (no index) means the device current where it was built: the worker
    threads must bind that one, not re-read `cuda` on a fresh thread (cuda:0) or reject it."""
    bound = []
    current = {"index": 1}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: bound.append(d))
    engine = SimpleNamespace(
        pctx=SimpleNamespace(device=torch.device("cuda")),
        model=SimpleNamespace(dtype=torch.bfloat16),
        cfg=SimpleNamespace(block_size=16, chunked_prefill=True),
        speculation=SimpleNamespace(tokens=0),  # Info.speculate
    )
    d = tempfile.mkdtemp(prefix="qt", dir="/tmp")
    path = os.path.join(d, "s-1")
    server = make_server(LoraxServicer(engine, os.path.join(d, "s"), "cuda"), path)
    current["index"] = 0  # what a fresh worker thread would see
    try:
        with grpc.insecure_channel(f"unix://{path}") as channel:
            pb_grpc.LoraxServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert bound and all(isinstance(dev, torch.device) and dev.index == 1 for dev in bound), bound
    finally:
        server.stop(None)
        shutil.rmtree(d, ignore_errors=True)
