"""worker/health.py without grpcio-health-checking / grpcio-reflection (a bare GPU image): the shard
still starts and serves, without the two standard services."""

from __future__ import annotations

import sys
from concurrent import futures

import grpc
import pytest

from worker.health import ShardHealth


def test_shard_health_without_the_packages_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grpc_health.v1", None)  # `import grpc_health.v1` raises ImportError
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    health = ShardHealth(server)
    health.serving()
    health.shutdown()
    server.stop(None)


def test_shard_health_with_the_packages_registers_the_services() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    health = ShardHealth(server)
    assert health._health is not None
    server.stop(None)
