"""The gRPC transport: a server for the core's services, bound and ready to start, with health and reflection.

`create_server(core, settings)` registers the servicers, the call gate, health and reflection, and binds the
port (0 in tests), but starts nothing and loads nothing: the application layer (`hyperrec/app/lifecycle.py`)
starts it, says when it is SERVING and drains it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperrec.core.admission import AdaptiveLimit, LimitSettings
from hyperrec.core.errors import ConfigError
from hyperrec.core.ingest import ProfileService
from hyperrec.core.model_manager import ModelManager
from hyperrec.core.pipeline import RecommendPipeline
from hyperrec.core.tokens import Token
from hyperrec.server.admin import ADMIN_SERVICE_NAME, ModelAdminServicer, add_admin_to_server
from hyperrec.server.auth import TokenAuth
from hyperrec.server.discovery import HealthService, enable_reflection
from hyperrec.server.gate import CallGate
from hyperrec.server.servicer import PROFILES_SERVICE_NAME, SERVICE_NAME, ProfilesServicer, RecommenderServicer
from hyperrec.server.servicer import add_profiles_to_server as add_profiles
from hyperrec.server.servicer import add_to_server as add_recommender
from hyperrec.server.tls import server_credentials

CONNECTION_AGE_GRACE_S = 30.0  # calls in flight on a connection closed for its age get this long to finish
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICES = ("", SERVICE_NAME, PROFILES_SERVICE_NAME)  # the names whose status set_serving reports
SERVICE_SCOPES = {SERVICE_NAME: "recommend", PROFILES_SERVICE_NAME: "ingest", ADMIN_SERVICE_NAME: "admin"}


@dataclass(frozen=True)
class TransportSettings:
    """How the gRPC server listens and whom it lets in; the application layer builds it from its config."""

    host: str  # address to listen on
    port: int  # 0 picks a free one
    tls_cert: Path | None  # PEM certificate chain; with tls_key the port speaks TLS only
    tls_key: Path | None
    tls_client_ca: Path | None  # PEM CA bundle clients' certificates must chain to (mutual TLS)
    max_message_bytes: int  # largest request accepted
    max_connection_age_s: float  # connections are closed (GOAWAY) after about this long; 0: never
    health_port: int | None  # a second, plaintext port answering only grpc.health.v1; None: none
    tokens: tuple[Token, ...]  # bearer tokens and their scopes (admin_token is one with the admin scope)
    max_in_flight: int  # most Recommender and Profiles calls in progress at once (the adaptive limit's ceiling)
    min_in_flight: int = 4  # the adaptive limit's floor
    latency_tolerance: float = 2.0  # latency up to this many times the unloaded one does not shrink the limit
    limit_window_s: float = 0.1  # how often the adaptive limit is recomputed
    compute_capacity: int = 1  # calls computed at once (compute threads): beyond it calls queue
    pending_calls: int = 5000  # calls grpc-core holds before the Python server loop takes them (see server_options)


def limit_settings(settings: TransportSettings) -> LimitSettings:
    """The adaptive concurrency limit's settings from the transport's (the floor never above the ceiling)."""
    return LimitSettings(
        min_limit=min(settings.min_in_flight, settings.max_in_flight),
        max_limit=settings.max_in_flight,
        tolerance=settings.latency_tolerance,
        window_s=settings.limit_window_s,
        capacity=settings.compute_capacity,
    )


class ServedCore(Protocol):
    """The core components the gRPC services call (the application layer's assembly provides them)."""

    @property
    def pipeline(self) -> RecommendPipeline: ...

    @property
    def profile_service(self) -> ProfileService: ...

    @property
    def manager(self) -> ModelManager: ...


def server_options(settings: TransportSettings) -> list[tuple[str, int]]:
    """grpcio channel arguments: message size, pending-call limits and connection age."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # grpc-core holds each arriving call until the Python server loop asks for the next one (grpcio's aio
        # server asks one at a time, between the event loop's other work); the gate then admits it or refuses it
        # RESOURCE_EXHAUSTED before its message is decoded. Beyond `pending_calls` held calls grpc-core drops the
        # excess itself, without any Python code running: the client sees CANCELLED (the filter-stack server
        # grpcio 1.85 uses kills the unrequested call; no option picks another status; grpc-core's newer
        # promise-based server answers RESOURCE_EXHAUSTED "Too many pending requests for this server" instead),
        # tried with a loop kept busy: the calls beyond the bound ended CANCELLED. So the bound is a last resort:
        # large enough that a burst reaches the gate and is refused RESOURCE_EXHAUSTED (a refusal costs the loop
        # a fraction of a millisecond), small enough to bound memory and the time a burst can wait to be refused.
        # Equal soft and hard limits: no random early drops below it.
        ("grpc.server.max_pending_requests", settings.pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", settings.pending_calls),
        # Several worker processes share one port (`hyperrec serve --workers N`); on by default on Linux, set
        # explicitly so it never depends on the default.
        ("grpc.so_reuseport", 1),
    ]
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1e3)),
            ("grpc.max_connection_age_grace_ms", int(CONNECTION_AGE_GRACE_S * 1e3)),
        ]
    return options


def listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, why: str) -> int:
    """Add a plaintext or TLS port; the bound port, or ConfigError when grpcio cannot bind it. grpcio gives no
    reason (it raises RuntimeError, or returns 0), so `why` names the likely ones."""
    try:
        port = (
            server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(f"cannot listen on {address}: {why}")
    return port


def bind(server: grpc.aio.Server, settings: TransportSettings) -> int:
    """Listen on the configured address (TLS when configured); the bound port, or ConfigError saying why not."""
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    why = "the address is in use or not local"
    if credentials is not None:
        why = "tls_cert and tls_key are not a usable pair (the key must be the certificate's), or " + why
    return listen(server, f"{settings.host}:{settings.port}", credentials, why)


def health_only_server(health: HealthService, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A plaintext server answering only grpc.health.v1 (the same statuses as the main port) on `port`."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server, listen(server, f"{host}:{port}", None, "health_port: the address is in use or not local")


class GrpcServer:
    """The bound gRPC server, its health service and the optional health-only port, started and stopped
    together."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health: HealthService,
        gate: CallGate,
        health_only: tuple[grpc.aio.Server, int] | None = None,
    ) -> None:
        self.server = server
        self.health = health
        self.gate = gate
        self.health_only = health_only  # (server, bound port) of the plaintext health-only port

    async def start(self) -> None:
        """Start answering on the main port and on the health-only port."""
        await self.server.start()
        if self.health_only is not None:
            await self.health_only[0].start()

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server and for each of its data services."""
        status = SERVING if serving else NOT_SERVING
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service from now on (later set_serving calls are ignored), still
        answering calls."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """End the drain: refuse calls arriving from now on (UNAVAILABLE, at the gate), give every call admitted
        before `grace` seconds to finish, then stop grpc (cutting only what is still running) and close both
        ports. Stopping grpc at once would cancel admitted calls still waiting in the event loop."""
        cut_at = time.monotonic() + grace
        self.gate.close()
        await self.gate.wait_idle(grace)
        await self.server.stop(max(0.0, cut_at - time.monotonic()))
        if self.health_only is not None:
            await self.health_only[0].stop(0)


def create_server(core: ServedCore, settings: TransportSettings) -> tuple[GrpcServer, int]:
    """A gRPC server for `core`'s services, bound (ConfigError when it cannot be), and its bound port."""
    limit = AdaptiveLimit(limit_settings(settings), time.perf_counter())
    gate = CallGate(TokenAuth(settings.tokens), limit, SERVICE_SCOPES)
    server = grpc.aio.server(interceptors=(gate,), options=server_options(settings))
    add_recommender(RecommenderServicer(core.pipeline), server)
    add_profiles(ProfilesServicer(core.profile_service), server)
    add_admin_to_server(ModelAdminServicer(core.manager), server)
    health = HealthService()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(server, (SERVICE_NAME, PROFILES_SERVICE_NAME, ADMIN_SERVICE_NAME))
    port = bind(server, settings)
    health_only = (
        None if settings.health_port is None else health_only_server(health, settings.host, settings.health_port)
    )
    return GrpcServer(server, health, gate, health_only), port
