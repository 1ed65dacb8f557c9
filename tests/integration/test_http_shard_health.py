"""The shards' standard gRPC services, on a real shard process: `grpc.health.v1` answers NOT_SERVING
until Warmup, SERVING after, and NOT_SERVING to a Watch once shutdown begins; server reflection lists
the services (what grpcurl needs); LoRAX's own Health RPC is unchanged."""

from __future__ import annotations

import os
import signal
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shards import start_launcher, stop

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def fresh_shard(demo_dir):
    s = start_launcher(os.path.join(demo_dir, "model"), os.path.join(demo_dir, "adapters"))
    yield s
    if s.proc.poll() is None:
        stop(s)


def check(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_reflection_lists_the_services(fresh_shard):
    with grpc.insecure_channel(f"unix://{fresh_shard.uds}-0") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest
        replies = list(stub.ServerReflectionInfo(iter([ask(list_services="")]), timeout=10))
        names = {svc.name for svc in replies[0].list_services_response.service}
        assert {"generate.v1.LoraxService", "grpc.health.v1.Health"} <= names
        files = list(
            stub.ServerReflectionInfo(iter([ask(file_containing_symbol="generate.v1.LoraxService")]), timeout=10)
        )
        assert files[0].file_descriptor_response.file_descriptor_proto  # grpcurl can describe the service


def test_health_follows_warmup_and_shutdown(fresh_shard, tok):  # last: it stops the shard
    from router_client.router import Router, RouterConfig
    from worker.pb import generate_pb2 as pb
    from worker.pb import generate_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"unix://{fresh_shard.uds}-0")
    assert check(channel) == NOT_SERVING  # up, but the KV cache is not sized yet
    assert check(channel, "generate.v1.LoraxService") == NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        check(channel, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    pb_grpc.LoraxServiceStub(channel).Health(pb.HealthRequest(), timeout=30)  # LoRAX's Health works throughout

    with Router.connect(
        f"{fresh_shard.uds}-0", tokenizer=tok, config=RouterConfig(max_input_length=32, max_total_tokens=64)
    ):
        pass  # ClearCache → Info → Warmup
    assert check(channel) == SERVING and check(channel, "generate.v1.LoraxService") == SERVING

    # a probe watching the shard sees NOT_SERVING when it is told to stop
    updates: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        try:
            for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30):
                updates.append(reply.status)
                watching.set()
        except grpc.RpcError:
            pass  # the server went away

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert watching.wait(10) and updates == [SERVING]
    fresh_shard.proc.send_signal(signal.SIGTERM)
    thread.join(timeout=30)
    assert NOT_SERVING in updates[1:], updates
    assert stop(fresh_shard) == 0
    channel.close()
