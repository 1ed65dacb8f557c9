"""The package installs from its own files: in a fresh virtualenv, `pip install -e .` and `pip install .` of a
copy of the tracked files each give importable protobuf stubs (generated at build time), and the installed
console scripts serve the demo model and its adapters. Minutes, so it runs only when asked:
`make test-packaging` (CI does)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMPORT_STUBS = "import worker.pb.generate_pb2_grpc as g; print(g.__file__)"

pytestmark = pytest.mark.skipif(
    not os.environ.get("QWEN_PACKAGING_TEST"), reason="minutes: set QWEN_PACKAGING_TEST=1 (make test-packaging)"
)


@dataclass
class Venv:
    bin: str

    def run(self, *args: str, cwd: str) -> str:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def pip(self, *args: str, cwd: str) -> None:
        self.run(os.path.join(self.bin, "python"), "-m", "pip", "install", "-q", *args, cwd=cwd)

    def stubs_file(self, cwd: str) -> str:
        return self.run(os.path.join(self.bin, "python"), "-c", IMPORT_STUBS, cwd=cwd).strip()


def copy_tracked_files(dst: str) -> None:
    """What a clean clone holds (plus files not yet committed, but nothing git ignores, e.g. worker/pb/)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, rel))


def test_fresh_venv_installs_and_serves(tmp_path, demo_dir):
    src, work = str(tmp_path / "src"), str(tmp_path / "work")  # commands run in `work`, outside the sources
    os.makedirs(work)
    copy_tracked_files(src)
    assert not os.path.exists(os.path.join(src, "worker", "pb", "generate_pb2_grpc.py"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    venv = Venv(str(tmp_path / "venv" / "bin"))
    if shutil.which("nvidia-smi") is None:
        venv.pip("torch==2.13.0", cwd=work)  # the CPU build, from local disk

    venv.pip("-e", src, cwd=work)  # PEP 660: worker/ is imported from the source tree, stubs included
    assert venv.stubs_file(work) == os.path.join(src, "worker", "pb", "generate_pb2_grpc.py")

    for name in ("generate_pb2.py", "generate_pb2_grpc.py"):
        os.remove(os.path.join(src, "worker", "pb", name))
    venv.pip(src, cwd=work)  # a wheel: the stubs are generated into it
    site_stubs = venv.stubs_file(work)
    assert site_stubs.endswith(os.path.join("site-packages", "worker", "pb", "generate_pb2_grpc.py")), site_stubs
    shipped = venv.run(
        os.path.join(venv.bin, "python"),
        "-c",
        "import importlib.resources as r; print(*sorted(p.name for p in r.files('worker.kernels').iterdir()))",
        cwd=work,
    ).split()  # the CUDA kernels' sources travel in the wheel (nvcc builds them on first use, gemv_cuda.py)
    assert {"gptq_gemv.cu", "gptq_mma.cu", "gptq_tc.cu", "gptq_cuda.cuh"} <= set(shipped), shipped

    sock_dir = tempfile.mkdtemp(prefix="qw", dir="/tmp")  # unix socket paths are limited to 107 bytes
    uds = os.path.join(sock_dir, "s")
    model, adapters = os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "shard.log", "w") as log:
        shard = subprocess.Popen(
            [
                os.path.join(venv.bin, "qwen-launch"),
                model,
                "--uds-path",
                uds,
                "--adapter-root",
                adapters,
                "--max-total-tokens",
                "1024",
            ],
            cwd=work,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 180
        while not os.path.exists(f"{uds}-0"):
            assert shard.poll() is None and time.time() < deadline, (tmp_path / "shard.log").read_text()[-3000:]
            time.sleep(0.2)
        router = [
            os.path.join(venv.bin, "qwen-router"),
            "generate",
            "--uds-path",
            uds,
            "--model-dir",
            model,
            "--max-input-length",
            "64",
            "--max-total-tokens",
            "256",
            "--max-batch-prefill-tokens",
            "256",
            "--max-new-tokens",
            "16",
        ]
        base = venv.run(*router, "The capital of France is", cwd=work)
        assert base.startswith(" Paris, a city of light"), base
        pirate = venv.run(*router, "--adapter", "pirate", "Tell me a story:", cwd=work)
        assert " Arr, the ship sailed" in pirate, pirate
    finally:
        shard.send_signal(signal.SIGTERM)
        try:
            rc = shard.wait(timeout=60)
        except subprocess.TimeoutExpired:
            shard.kill()
            rc = -9
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert rc == 0, (tmp_path / "shard.log").read_text()[-3000:]
