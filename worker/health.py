"""The standard gRPC services of a shard, beside LoRAX's own (whose Health RPC is unchanged):
`grpc.health.v1.Health` for grpc-health-probe and Kubernetes gRPC probes, and server reflection for
grpcurl. Health answers NOT_SERVING until the first Warmup succeeded (the KV cache is sized then),
SERVING after, and NOT_SERVING again once shutdown began.

grpcio-health-checking and grpcio-reflection are dependencies of the package; an environment built
without them (a bare GPU image) still serves LoRAX's contract, without these two services, and says so.
"""

from __future__ import annotations

import logging

import grpc

from worker.pb import generate_pb2 as pb

log = logging.getLogger(__name__)
LORAX_SERVICE = pb.DESCRIPTOR.services_by_name["LoraxService"].full_name  # generate.v1.LoraxService


class ShardHealth:
    """Registers health and reflection on `server` (before it starts); `serving()` after Warmup,
    `shutdown()` when the shard stops."""

    def __init__(self, server: grpc.Server) -> None:
        try:
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc
            from grpc_reflection.v1alpha import reflection
        except ImportError as err:
            log.warning("%s is not installed: no grpc.health.v1 or reflection on this shard", err.name)
            self._health = None
            return
        self._health = health.HealthServicer(experimental_non_blocking=True)
        self._serving, self._not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((LORAX_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self._set(self._not_serving)

    def _set(self, status: int) -> None:
        if self._health is not None:
            for name in ("", LORAX_SERVICE):  # "" is the whole server, as probes ask by default
                self._health.set(name, status)

    def serving(self) -> None:
        if self._health is not None:
            self._set(self._serving)

    def shutdown(self) -> None:
        """NOT_SERVING from now on, whatever is set later."""
        if self._health is not None:
            self._health.enter_graceful_shutdown()
