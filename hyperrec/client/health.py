"""A synchronous grpc.health.v1 client (used by `hyperrec health`, the container's health check)."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperrec.client.connect import Connection
from hyperrec.client.errors import ClientError, client_error

SERVING = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING)


def check(connection: Connection, service: str, timeout_s: float) -> str:
    """Ask whether `service` ("" for the whole server) is serving; the status name ("SERVING", "NOT_SERVING", ...).

    ClientError when the call fails (unknown service: NOT_FOUND; no server: UNAVAILABLE).
    """
    with connection.channel() as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stub's type stubs lack its methods
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            error = client_error(exc)
            if error.code == "NOT_FOUND" and not error.details:  # grpc's health servicer says no more than that
                error = ClientError(error.code, f"the server keeps no health status for service {service!r}")
            raise error from exc
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name
