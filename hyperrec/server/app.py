"""Server assembly and lifecycle: create, start, load a model, serve, drain.

`create_server(config)` wires the pieces and binds the port (0 in tests) but
loads nothing; `HyperrecServer.load_model()` loads and warms a bundle off the
event loop and only then flips health to SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from hyperrec.app.config import ServerConfig
from hyperrec.core import metrics, tracing
from hyperrec.core.batching import BatchSettings
from hyperrec.core.breaker import CircuitBreaker
from hyperrec.core.bundle import Bundle, list_versions
from hyperrec.core.cache import CacheSettings
from hyperrec.core.domain import RequestLimits
from hyperrec.core.errors import ConfigError, NotFound, ProfileStoreError
from hyperrec.core.files import read_file
from hyperrec.core.ingest import ProfileService
from hyperrec.core.model_manager import ModelManager, VersionLoadSettings
from hyperrec.core.pipeline import STORE_FAILURES, BundleSlot, PipelineOptions, RecommendPipeline
from hyperrec.core.profile import ProfileSettings
from hyperrec.core.profile_store import ProfileStore
from hyperrec.core.ranker import RankerOptions
from hyperrec.index import set_threads
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.memory import InMemoryProfileStore
from hyperrec.profiles.redis_store import RedisProfileStore, RedisStoreOptions
from hyperrec.profiles.snapshot import load_profiles
from hyperrec.server.admin import ADMIN_SERVICE_NAME, ModelAdminServicer, add_admin_to_server
from hyperrec.server.auth import TokenAuth
from hyperrec.server.gate import CallGate
from hyperrec.server.servicer import PROFILES_SERVICE_NAME, SERVICE_NAME, ProfilesServicer, RecommenderServicer
from hyperrec.server.servicer import add_profiles_to_server as add_profiles
from hyperrec.server.servicer import add_to_server as add_recommender

log = logging.getLogger(__name__)

PENDING_CALLS = 20_000  # calls grpc-core holds before they start (see server_options)
CONNECTION_AGE_GRACE_S = 30.0  # calls in flight on a connection closed for its age get this long to finish
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def build_profile_store(config: ServerConfig) -> ProfileStore:
    """Redis when a URL is configured, else the in-process store."""
    secret = config.profile_secret.encode() if config.profile_secret else secrets.token_bytes(32)
    pseudonymizer = Pseudonymizer(secret)
    settings = ProfileSettings(
        half_life_s=config.affinity_half_life_days * 86_400.0,
        recent_limit=config.recent_items,
        ttl_s=config.profile_ttl_s,
        dedupe_window_s=config.dedupe_window_s,
    )
    if config.redis_url:
        options = RedisStoreOptions(
            url=config.redis_url,
            connect_timeout_s=config.redis_connect_timeout_ms / 1e3,
            read_timeout_s=config.redis_read_timeout_ms / 1e3,
            settings=settings,
        )
        return RedisProfileStore(options, pseudonymizer)
    return InMemoryProfileStore(pseudonymizer, settings)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # grpc-core cancels calls beyond ~1,000 waiting to start (CANCELLED, before the gate sees them); let
        # them reach the gate, which refuses the excess RESOURCE_EXHAUSTED at once.
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
    ]
    if config.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1e3)),
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


def bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Listen on the configured address (TLS when configured); the bound port, or ConfigError saying why not."""
    credentials = server_credentials(config)
    why = "the address is in use or not local"
    if credentials is not None:
        why = "tls_cert and tls_key are not a usable pair (the key must be the certificate's), or " + why
    return listen(server, f"{config.host}:{config.port}", credentials, why)


def health_port(health: health_aio.HealthServicer, config: ServerConfig) -> tuple[grpc.aio.Server, int]:
    """A plaintext server answering only grpc.health.v1 (the same statuses as the main port) on `health_port`."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{config.host}:{config.health_port}"
    return server, listen(server, address, None, "health_port: the address is in use or not local")


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files (mutual TLS when a client CA is set), or None: plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    chain = read_file(config.tls_cert, "tls_cert")
    key = read_file(config.tls_key, "tls_key")
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise ConfigError(f"tls_cert {config.tls_cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"tls_key {config.tls_key} holds no PEM private key")
    client_ca = None if config.tls_client_ca is None else read_file(config.tls_client_ca, "tls_client_ca")
    try:
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )
    except (ValueError, TypeError) as exc:  # grpcio checks little here; bind() reports unusable files
        raise ConfigError(f"cannot use the TLS files: {exc}") from exc


class HyperrecServer:
    """A running (or ready to run) hyperrec server and everything it owns."""

    def __init__(
        self,
        config: ServerConfig,
        grpc_server: grpc.aio.Server,
        health: health_aio.HealthServicer,
        store: ProfileStore,
        slot: BundleSlot,
        executor: ThreadPoolExecutor,
        manager: ModelManager,
        loader: ThreadPoolExecutor,
        health_server: tuple[grpc.aio.Server, int] | None = None,
    ) -> None:
        self.config = config
        self.grpc_server = grpc_server
        self.health_server = health_server  # (server, bound port) of the plaintext health-only port
        self.health = health
        self.store = store
        self.slot = slot
        self.manager = manager
        self._executor = executor
        self._loader = loader
        self._stopping = asyncio.Event()
        self._watcher: asyncio.Future[None] | None = None

    async def start(self) -> None:
        await self.grpc_server.start()
        if self.health_server is not None:
            await self.health_server[0].start()

    async def set_serving(self, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        for service in ("", SERVICE_NAME, PROFILES_SERVICE_NAME):
            await self.health.set(service, status)

    async def load_model(self, version: int | None = None) -> Bundle:
        """Serve `version` (pinned), or `config.model_version`, or what the repository policy says (newest by
        default), loading and warming it off the event loop; then report SERVING."""
        manager = self.manager
        pinned = version or self.config.model_version
        if pinned is not None:
            await manager.activate(pinned, pin=True)
        elif await manager.reconcile() is None:
            some = list_versions(manager.repo, manager.model_name)
            problem = "no loadable version (see the errors above)" if some else "no versions"
            raise NotFound(f"model {manager.model_name!r} has {problem} in {manager.repo}")
        bundle = self.slot.active
        assert bundle is not None
        await self.set_serving(True)
        return bundle

    def start_watcher(self) -> None:
        """Follow the model repository every `watch_interval_s` (0: never)."""
        if self.config.watch_interval_s > 0 and self._watcher is None:
            self._watcher = asyncio.ensure_future(self.manager.watch(self.config.watch_interval_s, self._stopping))

    async def seed_profiles(self) -> int:
        """Load `config.seed_profiles` into the store; returns how many profiles."""
        if self.config.seed_profiles is None:
            return 0
        try:
            profiles = await asyncio.to_thread(load_profiles, self.config.seed_profiles)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot read seed profiles {self.config.seed_profiles}: {exc}") from exc
        users = list(profiles)
        for start in range(0, len(users), 500):
            await self.store.put_many({u: profiles[u] for u in users[start : start + 500]})
        log.info("seeded %d profiles from %s", len(profiles), self.config.seed_profiles)
        return len(profiles)

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Health NOT_SERVING at once while still answering for `drain` seconds (so load balancers move away),
        then refuse new calls, let in-flight ones finish within `grace`, and release everything."""
        await self.health.enter_graceful_shutdown()
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await asyncio.sleep(self.config.drain_s if drain is None else drain)
        await self.grpc_server.stop(self.config.grace_s if grace is None else grace)
        if self.health_server is not None:
            await self.health_server[0].stop(0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        await self.store.close()


def create_server(config: ServerConfig, profile_store: ProfileStore | None = None) -> tuple[HyperrecServer, int]:
    """Wire a server and bind its port; returns it with the bound port. Loads no model."""
    store = profile_store if profile_store is not None else build_profile_store(config)
    slot = BundleSlot()
    executor = ThreadPoolExecutor(
        max_workers=config.compute_threads,
        thread_name_prefix="hyperrec-compute",
        initializer=set_threads,  # OpenMP thread counts are per thread: set them where FAISS runs
        initargs=(config.faiss_threads,),
    )
    options = PipelineOptions(
        candidates=config.candidates,
        limits=RequestLimits(max_k=config.max_k, max_exclusions=config.max_exclusions),
        profile_budget_s=config.profile_budget_ms / 1e3,
        interest_events=config.interest_events,
        ranking_budget_s=config.ranking_budget_ms / 1e3,
        batching=BatchSettings(config.batch_max_size, config.batch_max_wait_us / 1e6, config.compute_threads),
        cache=CacheSettings(config.cache_ttl_s, config.cache_max_entries),
    )
    breaker = CircuitBreaker(
        config.breaker_failures,
        config.breaker_open_s,
        on_change=lambda state: metrics.BREAKER_STATE.set(state),
        failures=STORE_FAILURES,
    )
    metrics.BREAKER_STATE.set(breaker.state)
    pipeline = RecommendPipeline(store, slot, options, executor, breaker)
    loader = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="hyperrec-loader", initializer=set_threads, initargs=(config.faiss_threads,)
    )
    load_settings = VersionLoadSettings(
        RankerOptions(config.ort_intra_op_threads, config.ort_inter_op_threads),
        config.warmup_requests,
        config.candidates,
        config.keep_previous_version,
        config.affinity_half_life_days * 86_400.0,
        config.index_device,
    )
    recorded = pipeline.recent_requests
    manager = ModelManager(config.model_repo, config.model_name, slot, load_settings, loader, lambda: list(recorded))
    auth = TokenAuth.from_config(config.admin_token, config.auth_tokens)
    gate = CallGate(
        auth,
        config.max_in_flight,
        {SERVICE_NAME: "recommend", PROFILES_SERVICE_NAME: "ingest", ADMIN_SERVICE_NAME: "admin"},
    )
    server = grpc.aio.server(interceptors=(gate,), options=server_options(config))
    add_recommender(RecommenderServicer(pipeline), server)
    add_profiles(ProfilesServicer(ProfileService(store, slot, breaker, config.max_events_per_batch)), server)
    add_admin_to_server(ModelAdminServicer(manager), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            PROFILES_SERVICE_NAME,
            ADMIN_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = bind(server, config)
    health_only = None if config.health_port is None else health_port(health, config)
    return HyperrecServer(config, server, health, store, slot, executor, manager, loader, health_only), port


async def serve(config: ServerConfig, on_ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully. A signal during start-up stops it at once.

    `on_ready(port)` is called once the model is loaded and health says SERVING.
    """
    app, port = create_server(config)
    if config.otlp_endpoint:
        if not tracing.enabled():
            raise ConfigError("otlp_endpoint needs the tracing extra: pip install 'hyperrec[tracing]'")
        tracing.setup_otlp(config.otlp_endpoint)
        log.info("OpenTelemetry spans go to %s", config.otlp_endpoint)
    if config.metrics_port is not None:
        metrics.serve_metrics(config.metrics_port, config.host)
        log.info("Prometheus metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    await app.set_serving(False)
    await app.start()
    log.info("listening on %s:%d (health NOT_SERVING until a model is loaded)", config.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.ensure_future(start_up(app))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # start-up errors propagate (after the finally below releases everything)
            if on_ready is not None:
                on_ready(port)
            await stopping
        else:
            starting.cancel()
            log.info("stopped during start-up")
        log.info(
            "shutting down: NOT_SERVING for %.1f s, then up to %.1f s for in-flight calls",
            config.drain_s,
            config.grace_s,
        )
    finally:
        await app.stop(drain=config.drain_s if stop.is_set() else 0.0)


async def start_up(app: HyperrecServer) -> None:
    """Check the store, seed profiles, load and warm the model. A store that is down is not fatal."""
    try:
        await app.store.ping()
        await app.seed_profiles()
    except ProfileStoreError as exc:  # served DEGRADED until the store comes back
        log.warning("profile store is not reachable at start, profiles not seeded: %s", exc)
    await app.load_model()
    app.start_watcher()
