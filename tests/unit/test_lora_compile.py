"""scripts/lora_compile.py: the "gemm" decode mode's LoRA kernels compile for sm_90 with Triton's bundled ptxas (no GPU
needed) without spilling at pool ranks 8 to 64 (serve's default --max-lora-rank is 64), as their launchers launch
them (issue 17: ln_1's shrink with its r_max-16 tile spilled 7 KB a thread at r_max 64); and the prefill shrink and
expand fit sm_90's shared memory at every tile their plan picks for the 7B and 72B widths (one short prompt alone at the
7B width once made the expand ask for 264-528 KB of the H200's 227)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_lora_kernels_compile_without_spills_up_to_rank_64_and_fit_shared_memory():
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "scripts/lora_compile.py", "--ranks", "8,16,32,64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    decode = [line for line in proc.stdout.splitlines() if line.startswith("r_max")]
    prefill = [line for line in proc.stdout.splitlines() if line.startswith("prefill expand")]
    assert len(decode) == 4 * 6 and "SPILLS" not in proc.stdout
    # one short prompt alone gives the widest K split (128 at the 7B MLP's width): its expand fits shared memory
    assert any("split 128" in line for line in prefill) and "TOO MUCH" not in proc.stdout
