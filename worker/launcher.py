"""`qwen-launch --num-shard N MODEL_DIR --uds-path P [worker flags]`: start and supervise N shards.

torchrun-style: each shard gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Ready when
every local socket `P-{rank}` exists. SIGTERM/SIGINT are forwarded; if any shard exits, the others
are stopped and the launcher exits non-zero naming the shard and its last log lines. Shards die with
the launcher (PR_SET_PDEATHSIG), so no process is left behind even if the launcher is killed.

Multi-node: run one launcher per host with the same --nnodes, --master-addr and --master-port and a
distinct --node-rank; shard ranks are node_rank * num_shard + local_rank.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec (or, die_with_parent_from_env, after it)
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


PARENT_ENV = "QWEN_LAUNCH_PARENT_PID"  # a parent that wants the launcher to die with it puts its pid here


def die_with_parent_from_env() -> None:
    """Where PARENT_ENV holds the launcher's parent's pid: SIGTERM when that parent dies (PR_SET_PDEATHSIG, set after
    exec), or exit now if it is already gone. A parent with gRPC loaded (the tests) starts the launcher so rather than
    with a preexec_fn, which forks and runs Python in the child: fresh launchers started that way died at times with
    "epoll_wait error: Bad file descriptor", most likely from gRPC's fork handlers in the child; without a preexec_fn
    subprocess uses vfork. The variable is not passed on to the shards (the launcher, without gRPC, starts them with a
    preexec_fn)."""
    pid = os.environ.pop(PARENT_ENV, "")
    if not pid:
        return
    _die_with_parent()
    if os.getppid() != int(pid):
        raise SystemExit(f"qwen-launch: the parent {pid} that {PARENT_ENV} names is gone")


class Shard:
    def __init__(self, rank: int, proc: subprocess.Popen, socket_path: str):
        self.rank = rank
        self.proc = proc
        self.socket_path = socket_path
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            print(f"[shard {self.rank}] {line}", file=sys.stderr, flush=True)


class Launcher:
    def __init__(
        self,
        model_dir: str,
        uds_path: str,
        num_shard: int,
        worker_args: Sequence[str],
        nnodes: int = 1,
        node_rank: int = 0,
        master_addr: str = "127.0.0.1",
        master_port: int | None = None,
        ready_timeout: float = 300.0,
    ):
        self.model_dir = model_dir
        self.uds_path = uds_path
        self.num_shard = num_shard
        self.worker_args = list(worker_args)
        self.nnodes = nnodes
        self.node_rank = node_rank
        self.master_addr = master_addr
        self.master_port = master_port or free_port()
        self.ready_timeout = ready_timeout
        self.shards: list[Shard] = []
        self.stopping = threading.Event()

    def start(self) -> None:
        world = self.num_shard * self.nnodes
        for local in range(self.num_shard):
            rank = self.node_rank * self.num_shard + local
            path = f"{self.uds_path}-{rank}"
            if os.path.exists(path):
                os.unlink(path)
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(local),
                LOCAL_WORLD_SIZE=str(self.num_shard),
                MASTER_ADDR=self.master_addr,
                MASTER_PORT=str(self.master_port),
                PYTHONUNBUFFERED="1",
            )
            cmd = [
                sys.executable,
                "-m",
                "worker.cli",
                "serve",
                self.model_dir,
                "--uds-path",
                self.uds_path,
                *self.worker_args,
            ]
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
            self.shards.append(Shard(rank, proc, path))

    def wait_ready(self) -> None:
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            dead = self.first_dead()
            if dead is not None:
                raise RuntimeError(self.describe_death(dead))
            if all(os.path.exists(s.socket_path) for s in self.shards):
                return
            time.sleep(0.1)
        missing = [s.socket_path for s in self.shards if not os.path.exists(s.socket_path)]
        raise TimeoutError(f"shards not ready after {self.ready_timeout:.0f}s: no socket at {', '.join(missing)}")

    def first_dead(self) -> Shard | None:
        return next((s for s in self.shards if s.proc.poll() is not None), None)

    def describe_death(self, shard: Shard) -> str:
        shard.reader.join(timeout=2)
        tail = "\n".join(f"    {line}" for line in shard.tail) or "    (no output)"
        return f"shard {shard.rank} exited with code {shard.proc.returncode}; its last log lines:\n{tail}"

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        for s in self.shards:
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for s in self.shards:
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
        for s in self.shards:
            if os.path.exists(s.socket_path):
                os.unlink(s.socket_path)

    def supervise(self) -> int:
        """Block until a signal or a shard exit; returns the launcher's exit code."""
        while not self.stopping.is_set():
            dead = self.first_dead()
            if dead is not None:
                print(
                    f"qwen-launch: {self.describe_death(dead)}\nqwen-launch: stopping the other shards",
                    file=sys.stderr,
                    flush=True,
                )
                self.stop()
                return 1
            self.stopping.wait(0.2)
        self.stop()
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    die_with_parent_from_env()
    ap = argparse.ArgumentParser(prog="qwen-launch", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--num-shard", type=int, default=1, help="shards on this node")
    ap.add_argument("--uds-path", default="/tmp/qwen-worker")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--master-addr", default="127.0.0.1")
    ap.add_argument("--master-port", type=int, default=None, help="default: a free port (single node)")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    args, worker_args = ap.parse_known_args(argv)
    if args.nnodes > 1 and args.master_port is None:
        ap.error("--master-port is required with --nnodes > 1 (every node must agree on it)")
    launcher = Launcher(
        args.model_dir,
        args.uds_path,
        args.num_shard,
        worker_args,
        args.nnodes,
        args.node_rank,
        args.master_addr,
        args.master_port,
        args.ready_timeout,
    )

    def on_signal(signum, _frame):
        print(f"qwen-launch: got signal {signum}, stopping shards", file=sys.stderr, flush=True)
        launcher.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    launcher.start()
    try:
        launcher.wait_ready()
    except (RuntimeError, TimeoutError) as exc:
        print(f"qwen-launch: {exc}", file=sys.stderr, flush=True)
        launcher.stop()
        return 1
    print(f"qwen-launch: {args.num_shard} shard(s) ready on {args.uds_path}-*", file=sys.stderr, flush=True)
    return launcher.supervise()


if __name__ == "__main__":
    sys.exit(main())
