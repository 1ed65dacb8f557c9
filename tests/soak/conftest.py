"""The soak marker: a CI-sized run in the default suite, a long one with QWEN_SOAK_REQUESTS (`make soak`)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: sustained mixed load through the router (size: QWEN_SOAK_REQUESTS)")
