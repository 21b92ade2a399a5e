"""`hyperrec serve --workers N`: N serving processes on one port under one supervisor.

Each worker is today's whole single-process server (`lifecycle.serve`) with its own event loop, its own thread
pools and its own model watcher, started with the multiprocessing *spawn* context (fork + exec: nothing of the
supervisor's interpreter, and so nothing of grpc, is inherited). The workers all bind the same port with
SO_REUSEPORT and the kernel spreads new connections over them; a connection stays with the worker that accepted
it. The supervisor never creates a gRPC channel or server (the CLI imports grpc for its client flags, but grpc
is initialised only by the first channel or server), so it can spawn replacements for its whole life.

The supervisor owns:
- signals: SIGTERM or SIGINT turn the aggregated health NOT_SERVING, are forwarded to every worker (each drains
  as a single process does: `drain_s` still answering, then `grace_s` for in-flight calls) and the supervisor
  exits 0 once they all have;
- restarts: a worker that dies is restarted after a backoff that doubles with each crash of its slot; a worker
  that dies before it ever reported ready counts as a start-up failure, and the supervisor gives up (exit 1,
  with the reason; 2 like a single process when the worker's start-up error was a bad configuration or no
  loadable model) when no worker was ever ready or a slot failed MAX_START_FAILURES times in a row;
- the health-only port (`health_port`): SERVING only while every worker has loaded its model and none is
  restarting or draining, answered from a small separate process (`hyperrec.server.health_process`);
- /metrics (`metrics_port`): prometheus-client's multiprocess mode over a fresh directory
  (PROMETHEUS_MULTIPROC_DIR), aggregated by MultiProcessCollector; dead workers are marked dead.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from hyperrec.app.config import ServerConfig
from hyperrec.core.errors import ConfigError

log = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")
MAX_START_FAILURES = 3  # consecutive deaths of one slot before it reported ready: the supervisor gives up
BACKOFF_BASE_S = 0.5  # first restart delay of a slot; doubled per crash, reset once a worker stays up STABLE_S
BACKOFF_MAX_S = 10.0
STABLE_S = 30.0
STOP_SLACK_S = 5.0  # beyond drain_s + grace_s, time the workers get to exit before they are killed
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def worker_count(config: ServerConfig) -> int:
    """The number of serving processes: `config.workers`, or for 0 one per usable core (1 with the in-process
    profile store, which cannot be shared between processes)."""
    if config.workers > 0:
        return config.workers
    if not config.redis_url:
        return 1
    return usable_cores()


def usable_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on (its CPU affinity), capped by a cgroup v2 CPU quota when there is one
    (a container limited to 2 CPUs on a 64-core node sees all 64 in its affinity)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def reserve_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` with SO_REUSEPORT and never listening: it resolves port 0 to a free
    port the workers can all bind (a port-0 bind cannot be shared), and holds that port while the supervisor
    lives, so a restarted worker finds it free. Connections only go to listening sockets, never to this one."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


def run_worker(config: ServerConfig, ready: Connection, supervisor: int) -> None:
    """Worker process entry point: today's single-process server; sends its pid on `ready` once SERVING."""
    from hyperrec.app.cli import run_async
    from hyperrec.app.lifecycle import serve
    from hyperrec.core.errors import HyperrecError
    from hyperrec.core.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    drain_when_orphaned(supervisor)
    try:
        run_async(serve(config, on_ready=lambda _port: ready.send(os.getpid())))
    except HyperrecError as exc:
        log.error("worker %d cannot serve: %s", os.getpid(), exc)
        raise SystemExit(2) from None


def drain_when_orphaned(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM (a drain, as from the supervisor) when the supervisor dies without
    stopping it (SIGKILL, the OOM killer), so no orphan keeps serving the port. Linux only (prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != supervisor:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_health(conn: Connection, host: str, port: int) -> None:
    """Health process entry point: signals are the supervisor's business; the process ends when `conn` closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from hyperrec.server.health_process import serve_health

    serve_health(conn, host, port)


def serve_metrics(path: str, port: int, host: str) -> None:
    """Serve /metrics on `port`: the samples of every worker's files under `path`, merged."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


@dataclass
class Slot:
    """One of the N worker positions and the process currently filling it."""

    index: int
    process: BaseProcess | None = None
    ready_conn: Connection | None = None
    ready_at: float | None = None  # when the current process reported SERVING; None: not (yet)
    crashes: int = 0  # deaths since the slot was last stable (sets the backoff)
    start_failures: int = 0  # consecutive deaths before reporting ready
    restart_at: float | None = None


class Supervisor:
    """Spawns, watches, restarts and stops the workers; serves the aggregated health and metrics."""

    def __init__(self, config: ServerConfig, workers: int) -> None:
        self.config = config
        self.slots = [Slot(i) for i in range(workers)]
        self.stopping = False
        self.failure: str | None = None
        self.failure_code = 1
        self.ever_ready = False
        self.metrics_dir = ""
        self.worker_config = config
        self.health: tuple[BaseProcess, Connection] | None = None
        self.seeded = False  # a worker with seed_profiles has been started
        self.published = False  # the health process starts NOT_SERVING
        self._wake_r, self._wake_w = socket.socketpair()

    def run(self) -> int:
        """Serve until a signal (exit 0 once the workers drained) or a fatal start-up failure (exit 1)."""
        self.metrics_dir = tempfile.mkdtemp(prefix="hyperrec-metrics-")
        os.environ[MULTIPROC_ENV] = self.metrics_dir  # before any worker starts: they inherit it
        reserved = reserve_port(self.config.host, self.config.port)
        port = reserved.getsockname()[1]
        self.worker_config = dataclasses.replace(self.config, workers=1, port=port, health_port=None, metrics_port=None)
        self._install_signals()
        try:
            self._start_health()
            self._start_metrics()
            try:
                for slot in self.slots:
                    self._spawn(slot)
                log.info(
                    "supervisor %d: %d workers on %s:%d; their metrics in %s",
                    os.getpid(),
                    len(self.slots),
                    self.config.host,
                    port,
                    self.metrics_dir,
                )
                while not self.stopping:
                    self._step()
            except BaseException:  # a bug here must not leave the workers running without their supervisor
                self.stopping = True
                self._stop_workers()
                raise
            return self._stop_workers()
        finally:
            self._close_health()
            reserved.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _start_metrics(self) -> None:
        """Serve the workers' metrics on `metrics_port` (a thread of this process; no worker runs yet)."""
        if self.config.metrics_port is None:
            return
        try:
            serve_metrics(self.metrics_dir, self.config.metrics_port, self.config.host)
        except OSError as exc:
            where = f"{self.config.host}:{self.config.metrics_port}"
            raise ConfigError(f"metrics_port: cannot listen on {where}: {exc}") from exc
        log.info("Prometheus metrics of all workers on port %d /metrics", self.config.metrics_port)

    def _install_signals(self) -> None:
        """SIGTERM and SIGINT start the drain; the wake-up socket interrupts the wait in `_step`."""
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if not self.stopping:
                log.info("supervisor got %s: draining the workers", signal.Signals(signum).name)
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def _spawn(self, slot: Slot) -> None:
        """Start a worker in `slot`. Only the first worker ever started seeds the (shared) profile store: a
        restarted one must not write the seed file's profiles over those the live workers have updated since."""
        receive, send = SPAWN.Pipe(duplex=False)
        config = self.worker_config
        if self.seeded:
            config = dataclasses.replace(config, seed_profiles=None)
        self.seeded = True
        process = SPAWN.Process(
            target=run_worker, args=(config, send, os.getpid()), name=f"hyperrec-worker-{slot.index}"
        )
        process.start()
        send.close()  # the worker holds the only writer: EOF on `receive` once it is gone
        slot.process, slot.ready_conn, slot.ready_at, slot.restart_at = process, receive, None, None
        log.info("worker %d started (pid %s)", slot.index, process.pid)

    def _start_health(self) -> None:
        """Start the health-only port's process and wait for its bound port (it fails like a bad bind would)."""
        if self.config.health_port is None:
            return
        mine, theirs = SPAWN.Pipe()
        process = SPAWN.Process(
            target=run_health, args=(theirs, self.config.host, self.config.health_port), name="hyperrec-health"
        )
        process.start()
        theirs.close()
        try:
            bound = mine.recv()
        except EOFError:
            process.join()
            raise ConfigError(f"health_port: cannot listen on {self.config.host}:{self.config.health_port}") from None
        self.health = (process, mine)
        log.info("health of all workers on %s:%d (plaintext, grpc.health.v1 only)", self.config.host, bound)

    def _close_health(self) -> None:
        if self.health is None:
            return
        process, conn = self.health
        conn.close()  # the health process ends on EOF
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()

    def _publish_health(self) -> None:
        """Tell the health process whether every worker is SERVING (only when that changes)."""
        serving = not self.stopping and all(s.ready_at is not None for s in self.slots)
        if self.health is None or serving == self.published:
            return
        self.published = serving
        try:
            self.health[1].send(serving)
        except OSError:
            self._fatal("the health-only port's process is gone")
        log.info("all workers SERVING" if serving else "health NOT_SERVING")

    def _fatal(self, reason: str, code: int = 1) -> None:
        if self.failure is None:
            self.failure, self.failure_code = reason, code
            log.error("supervisor stops: %s", reason)
        self.stopping = True

    def _step(self) -> None:
        """Wait for something to happen (a report, a death, a signal, a due restart) and handle it."""
        now = time.monotonic()
        due = [s.restart_at for s in self.slots if s.restart_at is not None]
        timeout = max(0.0, min(due) - now) if due else None
        waitables: list[object] = [self._wake_r]
        waitables += [s.process.sentinel for s in self.slots if s.process is not None]
        waitables += [s.ready_conn for s in self.slots if s.ready_conn is not None]
        if self.health is not None:
            waitables.append(self.health[0].sentinel)
        ready: set[object] = set(wait(waitables, timeout))  # type: ignore[arg-type]
        if self._wake_r in ready:
            self._wake_r.recv(4096)
        for slot in self.slots:
            self._check(slot, ready)
        if self.health is not None and self.health[0].sentinel in ready:
            self._fatal("the health-only port's process exited")
        for slot in self.slots:
            if not self.stopping and slot.restart_at is not None and slot.restart_at <= time.monotonic():
                self._spawn(slot)
        self._publish_health()

    def _check(self, slot: Slot, ready: set[object]) -> None:
        """Take `slot`'s readiness report and notice its process's death."""
        conn = slot.ready_conn
        if conn is not None and conn in ready:
            try:
                conn.recv()
                slot.ready_at = time.monotonic()
                slot.start_failures = 0
                self.ever_ready = True
                log.info("worker %d (pid %s) is SERVING", slot.index, slot.process.pid if slot.process else "?")
            except EOFError:
                conn.close()
                slot.ready_conn = None
        process = slot.process
        if process is not None and process.sentinel in ready:
            process.join()
            slot.process = None
            if slot.ready_conn is not None:
                slot.ready_conn.close()
                slot.ready_conn = None
            self._on_death(slot, process)

    def _on_death(self, slot: Slot, process: BaseProcess) -> None:
        """Mark a dead worker's metrics dead and schedule its replacement (or give up at start-up)."""
        from prometheus_client.multiprocess import mark_process_dead

        assert process.pid is not None
        mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        how = describe_exit(process.exitcode)
        was_ready, slot.ready_at = slot.ready_at, None
        if self.stopping:
            return
        now = time.monotonic()
        if was_ready is None:
            slot.start_failures += 1
            if not self.ever_ready:
                # exit 2 like a single process whose start-up fails (a bad config, no loadable model)
                code = 2 if process.exitcode == 2 else 1
                self._fatal(
                    f"worker {slot.index} (pid {process.pid}) {how} during start-up, before any was ready", code
                )
                return
            if slot.start_failures >= MAX_START_FAILURES:
                self._fatal(f"worker {slot.index} {how} during start-up {slot.start_failures} times in a row")
                return
        elif now - was_ready >= STABLE_S:
            slot.crashes = 0
        slot.crashes += 1
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (slot.crashes - 1))
        slot.restart_at = now + delay
        log.error("worker %d (pid %s) %s; restarting it in %.1f s", slot.index, process.pid, how, delay)

    def _stop_workers(self) -> int:
        """Forward SIGTERM, wait for the drains, kill what outlives them; 0 when every worker exited cleanly
        (and nothing failed before)."""
        self._publish_health()
        alive = [s.process for s in self.slots if s.process is not None and s.process.is_alive()]
        for process in alive:
            process.terminate()
        deadline = time.monotonic() + self.config.drain_s + self.config.grace_s + STOP_SLACK_S
        clean = True
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker (pid %s) did not finish its drain in time: killed", process.pid)
                process.kill()
                process.join()
                clean = False
            elif process.exitcode != 0:
                log.error("worker (pid %s) %s while draining", process.pid, describe_exit(process.exitcode))
                clean = False
        if self.failure is not None:
            log.error("supervisor exits: %s", self.failure)
            return self.failure_code
        log.info("all workers drained")
        return 0 if clean else 1


def supervise(config: ServerConfig, workers: int) -> int:
    """Run `workers` serving processes until a signal; the process exit status."""
    return Supervisor(config, workers).run()
