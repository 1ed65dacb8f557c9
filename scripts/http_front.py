"""`qwen-router serve` (the HTTP front) as a child process of a script, on a free port of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def front_command(uds: str, model_dir: str, port: int, *args: str) -> list[str]:
    """`python -m router_client.cli serve` on the shards at `uds`, listening on `port`."""
    return [
        sys.executable,
        "-m",
        "router_client.cli",
        "serve",
        "--uds-path",
        uds,
        "--model-dir",
        model_dir,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *args,
    ]


def start_front(cmd: Sequence[str], port: int, timeout_s: float) -> subprocess.Popen[bytes]:
    """Start `cmd` from the repository root and wait until its /health answers 200. RuntimeError (the
    process killed) when it exits first or does not answer within timeout_s."""
    front = subprocess.Popen(list(cmd), cwd=ROOT)
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as answer:
                if answer.status == 200:
                    return front
        except OSError:
            pass
        if front.poll() is not None or time.time() > deadline:
            front.kill()
            raise RuntimeError("the HTTP front did not start")
        time.sleep(0.2)
