"""The health-only port of a multi-worker server, served from its own process.

With `--workers N` the N serving processes share the main port (SO_REUSEPORT), so a health check there reaches
one worker picked by the kernel. The plaintext health-only port must answer for all of them; the supervisor
computes that answer (SERVING only while every worker is) and sends it here over a pipe. This process is
separate from the supervisor so that the supervisor never initialises grpc (it keeps spawning workers for its
whole life), and it exits when the pipe closes, so it never outlives its supervisor.
"""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection

from hyperrec.server.discovery import HealthService
from hyperrec.server.transport import HEALTH_SERVICES, NOT_SERVING, SERVING, health_only_server


async def _set_all(health: HealthService, status: int) -> None:
    for service in HEALTH_SERVICES:
        await health.set(service, status)


async def _serve(conn: Connection, host: str, port: int) -> None:
    """Answer grpc.health.v1 on `port` with the last status received (NOT_SERVING until the first one)."""
    health = HealthService()
    server, bound = health_only_server(health, host, port)
    await _set_all(health, NOT_SERVING)
    await server.start()
    conn.send(bound)
    try:
        while True:
            try:
                serving = await asyncio.to_thread(conn.recv)
            except EOFError:  # the supervisor is gone or done
                break
            await _set_all(health, SERVING if serving else NOT_SERVING)
    finally:
        await server.stop(0)


def serve_health(conn: Connection, host: str, port: int) -> None:
    """Process entry point: serve the aggregated health on `host:port` until `conn` closes. The first message
    sent back is the bound port; each message received is a bool (every worker SERVING)."""
    asyncio.run(_serve(conn, host, port))
