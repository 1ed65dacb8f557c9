"""Fixtures: a real shard process on the demo model."""
from __future__ import annotations

import os

import pytest

from shards import start_launcher, stop


@pytest.fixture(scope="module")
def shard(demo_dir):
    s = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"))
    yield s
    assert stop(s) == 0, s.log()[-3000:]
