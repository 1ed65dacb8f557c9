"""worker.launcher.die_with_parent_from_env: a launcher started with QWEN_LAUNCH_PARENT_PID (the tests start it so,
without a fork that runs Python in a process with gRPC loaded) dies with that parent: PR_SET_PDEATHSIG is SIGTERM
after the call, the variable is not handed on to the shards, a parent already gone ends it at once, and without the
variable nothing is set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = """
import ctypes, os, signal
from worker.launcher import PARENT_ENV, die_with_parent_from_env
die_with_parent_from_env()
sig = ctypes.c_int(-1)
ctypes.CDLL("libc.so.6").prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
print(sig.value, PARENT_ENV in os.environ)
"""


def _probe(parent: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QWEN_LAUNCH_PARENT_PID"}
    if parent is not None:
        env["QWEN_LAUNCH_PARENT_PID"] = parent
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_the_launcher_dies_with_the_parent_its_environment_names():
    done = _probe(str(os.getpid()))  # this process is the probe's parent
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(int(signal.SIGTERM)), "False"]


def test_a_parent_already_gone_ends_the_launcher():
    done = _probe(str(2**22 + 7))  # no parent of that pid
    assert done.returncode != 0 and "is gone" in done.stderr


def test_without_the_variable_nothing_is_set():
    done = _probe(None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "False"]
