"""The server process: build, start, load a model, serve until a signal, drain.

`build_server(config)` assembles the components and binds the gRPC port (0 in tests) but loads nothing;
`HyperrecServer.load_model()` loads and warms a bundle off the event loop and only then flips health to
SERVING. `serve(config)` is the whole process: start-up, SIGTERM/SIGINT, and the drain (health NOT_SERVING while
still answering, then stop with a grace period, then release the thread pools and the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from hyperrec.app.assembly import Components, assemble, transport_settings
from hyperrec.app.config import ServerConfig
from hyperrec.core import metrics, tracing
from hyperrec.core.bundle import Bundle, list_versions
from hyperrec.core.errors import ConfigError, NotFound, ProfileStoreError
from hyperrec.core.model_manager import ModelManager
from hyperrec.core.pipeline import BundleSlot
from hyperrec.core.profile_store import ProfileStore
from hyperrec.profiles.snapshot import load_profiles
from hyperrec.server.transport import GrpcServer, create_server

log = logging.getLogger(__name__)

SEED_BATCH = 500  # profiles written to the store per call while seeding


class HyperrecServer:
    """A running (or ready to run) hyperrec server: its components, its gRPC transport and its background work."""

    def __init__(self, config: ServerConfig, components: Components, transport: GrpcServer) -> None:
        self.config = config
        self.components = components
        self.transport = transport
        self._stopping = asyncio.Event()
        self._watcher: asyncio.Future[None] | None = None

    @property
    def store(self) -> ProfileStore:
        return self.components.store

    @property
    def slot(self) -> BundleSlot:
        return self.components.slot

    @property
    def manager(self) -> ModelManager:
        return self.components.manager

    async def start(self) -> None:
        """Start answering calls (health says whatever set_serving last said)."""
        await self.transport.start()

    async def set_serving(self, serving: bool) -> None:
        await self.transport.set_serving(serving)

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
        for start in range(0, len(users), SEED_BATCH):
            await self.store.put_many({u: profiles[u] for u in users[start : start + SEED_BATCH]})
        log.info("seeded %d profiles from %s", len(profiles), self.config.seed_profiles)
        return len(profiles)

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Health NOT_SERVING at once while still answering for `drain` seconds (so load balancers move away),
        then refuse new calls, let in-flight ones finish within `grace`, and release everything."""
        await self.transport.enter_graceful_shutdown()
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await asyncio.sleep(self.config.drain_s if drain is None else drain)
        await self.transport.stop(self.config.grace_s if grace is None else grace)
        await self.components.release()


def build_server(config: ServerConfig, profile_store: ProfileStore | None = None) -> tuple[HyperrecServer, int]:
    """Assemble the components (with `profile_store` instead of the configured store when given) and bind the
    gRPC port; returns the server with the bound port. Starts nothing and loads no model."""
    components = assemble(config, profile_store)
    try:
        transport, port = create_server(components, transport_settings(config))
    except BaseException:
        components.executor.shutdown(wait=False)  # nothing ran on them yet; the store has not connected
        components.loader.shutdown(wait=False)
        raise
    return HyperrecServer(config, components, transport), port


def start_observability(config: ServerConfig) -> None:
    """Export spans to the OTLP collector and serve Prometheus metrics, when configured."""
    if config.otlp_endpoint:
        if not tracing.enabled():
            raise ConfigError("otlp_endpoint needs the tracing extra: pip install 'hyperrec[tracing]'")
        tracing.setup_otlp(config.otlp_endpoint)
        log.info("OpenTelemetry spans go to %s", config.otlp_endpoint)
    if config.metrics_port is not None:
        metrics.serve_metrics(config.metrics_port, config.host)
        log.info("Prometheus metrics on http://%s:%d/metrics", config.host, config.metrics_port)


async def serve(config: ServerConfig, on_ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully. A signal during start-up stops it at once.

    `on_ready(port)` is called once the model is loaded and health says SERVING.
    """
    app, port = build_server(config)
    start_observability(config)
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
