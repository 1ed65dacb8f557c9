"""The HTTP front (`qwen-router serve`) as a real process for tests, beside shards.py's shard processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx

from shards import ROOT, ShardProc

FRONT_LIMITS = ("--max-input-length", "128", "--max-total-tokens", "256", "--max-batch-prefill-tokens", "512")


@dataclass
class FrontProc:
    url: str
    proc: subprocess.Popen
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_front(shard: ShardProc, demo_dir: str, extra: tuple[str, ...] = ()) -> FrontProc:
    """`qwen-router serve` on the shard, ready once /health answers 200."""
    port = free_port()
    log_path = os.path.join(tempfile.mkdtemp(prefix="qwf"), "front.log")
    cmd = [
        sys.executable,
        "-m",
        "router_client.cli",
        "serve",
        "--uds-path",
        shard.uds,
        "--model-dir",
        os.path.join(demo_dir, "model"),
        "--adapter-root",
        os.path.join(demo_dir, "adapters"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *FRONT_LIMITS,
        *extra,
    ]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    front = FrontProc(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{front.url}/health", timeout=30).status_code == 200:
                return front
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("the front did not start:\n" + front.log()[-4000:])
        time.sleep(0.2)


def stop_front(front: FrontProc) -> int:
    front.proc.send_signal(signal.SIGTERM)
    try:
        return front.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        front.proc.kill()
        return -9
