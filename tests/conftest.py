"""Session fixtures; shared helpers live in tests/helpers.py (import them from `helpers`)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# No GPU: Triton kernels run in the interpreter, so CI tests each kernel's logic. Set before any test
# module imports triton (the GPU test modules are collected too, and skip themselves).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    """The demo model and adapters, built once per test session (seconds)."""
    from make_demo_model import ensure

    out = os.environ.get("QWEN_DEMO_DIR") or str(tmp_path_factory.mktemp("demo"))
    return ensure(out)


@pytest.fixture(scope="module")
def demo(demo_dir):
    """(the demo model in fp32, its tokenizer), loaded once per test module (the speculative tests attach
    Medusa heads to it, so modules do not share it); test_demo_model.py has its own `demo`."""
    from worker.models.qwen import FlashQwenForCausalLM
    from worker.tokenizer import QwenTokenizer

    path = os.path.join(demo_dir, "model")
    return FlashQwenForCausalLM.from_pretrained(path, dtype=torch.float32, progress=False), QwenTokenizer.from_dir(path)
