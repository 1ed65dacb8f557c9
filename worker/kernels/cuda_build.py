"""nvcc builds of this project's CUDA kernels (worker/kernels/*.cu) into shared libraries, cached by source hash.

No PyTorch headers, so no build against PyTorch's ABI: ctypes calls the library with raw pointers on PyTorch's
current stream. The library is cached under $QWEN_WORKER_CACHE (default ~/.cache/qwen-worker) by the hash of its
sources and headers and the device's compute capability; a build writes a temporary file and renames it, so
processes building the same library at once do not see a partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

log = logging.getLogger("worker")


class BuildError(RuntimeError):
    """Why there is no library (no nvcc, or nvcc's error)."""


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def build(
    stem: str, sources: tuple[str, ...], headers: tuple[str, ...], major: int, minor: int, nvcc: str | None
) -> str:
    """The path of `stem`'s library for compute capability major.minor, built from `sources` if not cached. The
    sources and `headers` (what they include) are compiled as copies side by side in one directory, so the headers
    given are the ones included wherever each file lies (an edited copy of one file beside the others' originals)."""
    if nvcc is None:
        raise BuildError("no nvcc (set CUDA_HOME)")
    names = [os.path.basename(name) for name in (*sources, *headers)]
    if len(set(names)) != len(names):
        raise BuildError(f"two files of one build share a name: {names}")
    h = hashlib.sha256()
    for path in (*sources, *headers):  # the names too: the copies' #include lines find the headers by name
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    digest = hashlib.sha256(h.digest() + f"{major}{minor}".encode()).hexdigest()[:16]
    cache = os.environ.get("QWEN_WORKER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qwen-worker")
    os.makedirs(cache, mode=0o700, exist_ok=True)
    path = os.path.join(cache, f"{stem}_{digest}.so")
    if not os.path.exists(path):
        arch = f"{major}{minor}"
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = os.path.join(tmp, "lib.so")
            for name in (*sources, *headers):
                shutil.copyfile(name, os.path.join(tmp, os.path.basename(name)))
            copies = [os.path.join(tmp, os.path.basename(name)) for name in sources]
            cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
            done = subprocess.run([*cmd, "-o", out, *copies], capture_output=True, text=True)
            if done.returncode != 0:
                raise BuildError(f"nvcc failed: {done.stderr.strip()[-500:]}")
            os.replace(out, path)  # atomic: another process may build the same file
        log.info("built %s for sm_%s: %s", stem, arch, path)
    return path
