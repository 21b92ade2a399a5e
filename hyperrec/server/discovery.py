"""What tools use to discover a server: grpc.health.v1 (with List) and server reflection (v1 and v1alpha).

grpcio's asyncio health servicer leaves `Health/List` unimplemented (it answers UNIMPLEMENTED and grpc logs the
NotImplementedError as an error), and grpcio-reflection serves only `grpc.reflection.v1alpha`, while current
tools (buf curl, grpcurl) ask `grpc.reflection.v1` first. The two protocol versions are the same messages under
another package name, so the v1 service is answered by the v1alpha servicer through a generic handler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as reflection_grpc

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = reflection.SERVICE_NAME


class HealthService(health_aio.HealthServicer):
    """grpc.health.v1 with `List`: the statuses of every service this server reports on."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, Any] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._shutting_down = False

    async def set(self, service: str, status: Any) -> None:
        """As the base class: ignored once shutting down."""
        if not self._shutting_down:
            self._statuses[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._shutting_down = True
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()

    async def List(self, request: Any, context: Any) -> Any:  # noqa: N802  (the RPC's name)
        statuses = {name: health_pb2.HealthCheckResponse(status=status) for name, status in self._statuses.items()}
        # HealthListResponse is missing from the health package's type stubs
        return health_pb2.HealthListResponse(statuses=statuses)  # type: ignore[attr-defined]


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve reflection for `service_names` (plus health and both reflection versions) under v1 and v1alpha."""
    names = (*service_names, HEALTH_SERVICE_NAME, REFLECTION_V1, REFLECTION_V1ALPHA)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    handler = grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})
    server.add_generic_rpc_handlers((handler,))
