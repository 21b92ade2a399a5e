"""Shared fixtures: a real redis-server on a free port, small real bundles, servers on port 0."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import wait_until

REDIS_HELP = (
    "redis-server is not on PATH. The test suite starts its own Redis and needs the binary: "
    "on Debian/Ubuntu run `sudo apt-get install -y redis-server` (the service need not run), "
    "on macOS `brew install redis`."
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A private redis-server on 127.0.0.1; can be stopped and restarted on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--protected-mode", "no", "--enable-debug-command", "local"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            wait_until(lambda: self._answers(client), f"redis-server to answer on port {self.port}", 10)
        finally:
            client.close()

    def _answers(self, client: redis.Redis) -> bool:
        """Whether the started redis-server answers PING yet; raises at once if it has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}")
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisProcess]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(REDIS_HELP, pytrace=False)
    with tempfile.TemporaryDirectory(prefix="hyperrec-redis-") as workdir:
        proc = RedisProcess(binary, Path(workdir))
        proc.start()
        try:
            yield proc
        finally:
            proc.stop()


@pytest.fixture
def redis_url(redis_process: RedisProcess) -> str:
    """URL of the session's Redis, flushed before each test (restarted if a test stopped it)."""
    if redis_process.proc is None:
        redis_process.start()
    redis.Redis.from_url(redis_process.url).flushall()
    return redis_process.url
