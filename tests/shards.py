"""Start and stop real shard processes (through the launcher) on real unix sockets, for tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import grpc

from worker.launcher import PARENT_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ShardProc:
    uds: str  # prefix: shard r listens on {uds}-{r}
    proc: subprocess.Popen
    log_path: str

    def stub(self, rank: int = 0):
        from worker.pb import generate_pb2_grpc as pb_grpc

        channel = grpc.insecure_channel(f"unix://{self.uds}-{rank}")
        return pb_grpc.LoraxServiceStub(channel)

    def stats(self, rank: int = 0, timeout: float = 30.0) -> dict:
        """Shard `rank`'s own bookkeeping (live batches, shard-owned KV blocks, adapter slots and lanes), read from
        Health's trailing metadata."""
        from worker.pb import generate_pb2 as pb
        from worker.pb import generate_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"unix://{self.uds}-{rank}") as channel:
            _, call = pb_grpc.LoraxServiceStub(channel).Health.with_call(pb.HealthRequest(), timeout=timeout)
        return json.loads(dict(call.trailing_metadata())["x-qwen-worker-stats"])

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def start_launcher(model_dir: str, adapter_root: str, num_shard: int = 1, extra: tuple[str, ...] = ()) -> ShardProc:
    """Launch the shards; a launcher that exits before its sockets appear is started once more, a second failure
    raises."""
    for attempt in (1, 2):
        try:
            return _start_once(model_dir, adapter_root, num_shard, extra)
        except _EarlyExit as exc:
            if attempt == 2:
                raise RuntimeError(str(exc)) from None
            print(f"shard launcher exited early, starting it again:\n{exc}", file=sys.stderr)
    raise AssertionError("unreachable")


def dying_with_us() -> dict[str, str]:
    """The environment that makes a launcher die with this process (no orphans even if pytest is killed), set by the
    launcher itself after its exec: started with a preexec_fn from this process, which has gRPC loaded, fresh
    launchers died at times ("epoll_wait error: Bad file descriptor"; worker.launcher.die_with_parent_from_env)."""
    return {PARENT_ENV: str(os.getpid())}


class _EarlyExit(RuntimeError):
    pass


def _start_once(model_dir: str, adapter_root: str, num_shard: int, extra: tuple[str, ...]) -> ShardProc:
    tmp = tempfile.mkdtemp(prefix="qw", dir="/tmp")  # short: unix socket paths are limited to 107 bytes
    uds = os.path.join(tmp, "s")
    log_dir = os.environ.get("QWEN_SHARD_LOG_DIR")  # e.g. the device's $OUT: logs survive a killed run
    log_path = os.path.join(log_dir, f"shard-{os.path.basename(tmp)}.log") if log_dir else os.path.join(tmp, "log.txt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **dying_with_us())
    cmd = [sys.executable, "-m", "worker.launcher", model_dir, "--num-shard", str(num_shard), "--uds-path", uds]
    cmd += ["--adapter-root", adapter_root, "--max-total-tokens", "4096", "--block-size", "16", *extra]
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not all(os.path.exists(f"{uds}-{r}") for r in range(num_shard)):
        if proc.poll() is not None:
            raise _EarlyExit("shards did not start:\n" + open(log_path).read()[-4000:])
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("shards did not start in 180 s:\n" + open(log_path).read()[-4000:])
        time.sleep(0.1)
    return ShardProc(uds, proc, log_path)


def stop(shard: ShardProc) -> int:
    shard.proc.send_signal(signal.SIGTERM)
    try:
        rc = shard.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        shard.proc.kill()
        rc = -9
    shutil.rmtree(os.path.dirname(shard.uds), ignore_errors=True)
    return rc
