"""`hyperrec serve --workers 2` as real processes: one port shared by two workers, a crashed worker restarted,
health SERVING only while both serve, metrics summed over both, SIGTERM drained to exit 0 (issue 15.4)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2_grpc
from prometheus_client.mmap_dict import MmapedDict

from hyperrec.app.config import load_config
from hyperrec.app.supervisor import usable_cores, worker_count
from hyperrec.core.bundle import EMBEDDINGS, INDEX, Bundle
from hyperrec.core.errors import ConfigError
from hyperrec.core.profile import Profile
from hyperrec.index import IndexParams, registry
from hyperrec.profiles.snapshot import save_profiles
from hyperrec.v1 import recommender_pb2 as pb
from hyperrec.v1 import recommender_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.helpers import NOT_SERVING, SERVING, health_status_sync, publish_toy, wait_until

ROOT = Path(__file__).resolve().parents[1]
SECRET = "workers-test-secret-0123456789"
REQUESTS = "hyperrec_grpc_requests_total"
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("workers-repo")
    publish_toy(repo, n_items=200, dim=8)
    return repo


@dataclass
class Supervised:
    proc: subprocess.Popen[bytes]
    port: int
    health_port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def workers(self) -> dict[int, int]:
        """The pid now filling each worker slot, from the supervisor's log."""
        return {int(slot): int(pid) for slot, pid in STARTED.findall(self.text())}

    def metrics_dir(self) -> Path:
        found = re.search(r"their metrics in (\S+)", self.text())
        assert found, self.text()
        return Path(found.group(1))

    def health(self) -> int | None:
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            return health_status_sync(health_pb2_grpc.HealthStub(channel))


@contextmanager
def supervised(repo: Path, tmp_path: Path, redis_url: str, *args: str) -> Iterator[Supervised]:
    """`hyperrec serve --workers 2` with a health-only and a metrics port, killed at the end if still running."""
    port, health_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--workers", "2", "--port", str(port)]
    cmd += ["--model-repo", str(repo), "--model-name", "toy", "--warmup-requests", "1", "--watch-interval-s", "0"]
    cmd += ["--redis-url", redis_url, "--health-port", str(health_port), "--metrics-port", str(metrics_port)]
    cmd += ["--redis-read-timeout-ms", "5000", "--profile-budget-ms", "5000", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYPERREC_", "PROMETHEUS_"))}
    env["HYPERREC_PROFILE_SECRET"] = SECRET
    log = tmp_path / f"supervisor-{port}.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    server = Supervised(proc, port, health_port, metrics_port, log)
    try:
        wait_until(lambda: server.health() == SERVING or proc.poll() is not None, "both workers to serve", 60, 0.1)
        assert proc.poll() is None, server.text()
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for pid in server.workers().values():  # workers outliving a killed supervisor would leak
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie waiting for its parent has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def recommend_on_new_connection(target: str, user: str) -> grpc.StatusCode:
    """One Recommend call over its own TCP connection (a local subchannel pool: channels share none), so the
    kernel picks a worker for each call."""
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        try:
            pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=10)
        except grpc.RpcError as exc:
            failed: grpc.Call = exc  # type: ignore[assignment]
            return failed.code()
    return grpc.StatusCode.OK


def answered_by(metrics_dir: Path, pid: int) -> float:
    """Recommend calls worker `pid` counted (its own multiprocess file, before aggregation)."""
    path = metrics_dir / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    total = 0.0
    for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
        _, sample, labels, _help = json.loads(key)
        if sample == REQUESTS and labels.get("method", "").endswith("/Recommend"):
            total += value
    return total


def scraped(metrics_port: int, name: str) -> float:
    """The sum of `name`'s samples on the supervisor's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def stop(server: Supervised) -> int:
    server.proc.send_signal(signal.SIGTERM)
    return server.proc.wait(timeout=60)


def test_two_workers_share_the_port_and_metrics_add_up(repo: Path, tmp_path: Path, redis_url: str) -> None:
    with supervised(repo, tmp_path, redis_url) as server:
        pids = set(server.workers().values())
        assert len(pids) == 2
        codes = [recommend_on_new_connection(server.target, f"user-{i}") for i in range(24)]
        assert codes == [grpc.StatusCode.OK] * 24
        per_worker = {pid: answered_by(server.metrics_dir(), pid) for pid in pids}
        assert all(n > 0 for n in per_worker.values()), per_worker  # both workers answered on the one port
        assert sum(per_worker.values()) == 24
        assert scraped(server.metrics_port, REQUESTS) == 24  # /metrics sums both workers
        assert stop(server) == 0


def test_a_killed_worker_is_restarted_and_health_waits_for_it(repo: Path, tmp_path: Path, redis_url: str) -> None:
    seed = tmp_path / "profiles.npz"
    save_profiles(seed, {"seeded-user": Profile(recent_items=("i1",), updated_at=1.0)})
    with supervised(repo, tmp_path, redis_url, "--seed-profiles", str(seed)) as server:
        before = server.workers()
        os.kill(before[0], signal.SIGKILL)
        wait_until(lambda: server.health() == NOT_SERVING, "health NOT_SERVING while a worker is down", 30, 0.02)
        assert recommend_on_new_connection(server.target, "while-one-is-down") == grpc.StatusCode.OK
        wait_until(lambda: server.workers()[0] != before[0], "worker 0 to be restarted", 30, 0.05)
        wait_until(lambda: server.health() == SERVING, "health SERVING with both workers again", 60, 0.05)
        assert server.workers()[1] == before[1]
        assert f"worker 0 (pid {before[0]}) was killed by SIGKILL" in server.text()
        assert all(recommend_on_new_connection(server.target, f"u{i}") == grpc.StatusCode.OK for i in range(8))
        assert server.text().count("seeded 1 profiles") == 1  # by the first worker only, never on a restart
        assert stop(server) == 0


def test_sigterm_drains_every_worker_and_exits_0(repo: Path, tmp_path: Path, redis_url: str) -> None:
    with supervised(repo, tmp_path, redis_url, "--drain-s", "3", "--grace-s", "1") as server:
        workers = server.workers().values()
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: server.health() == NOT_SERVING, "health NOT_SERVING during the drain", 10, 0.02)
        assert recommend_on_new_connection(server.target, "during-drain") == grpc.StatusCode.OK
        assert server.proc.wait(timeout=60) == 0
        assert not any(running(pid) for pid in workers)
        assert "all workers drained" in server.text()
        assert not server.metrics_dir().exists()


def test_workers_of_a_killed_supervisor_drain_and_exit(repo: Path, tmp_path: Path, redis_url: str) -> None:
    with supervised(repo, tmp_path, redis_url, "--drain-s", "0", "--grace-s", "1") as server:
        workers = list(server.workers().values())
        server.proc.kill()  # no chance to stop them: the kernel tells them (PR_SET_PDEATHSIG)
        server.proc.wait(timeout=10)
        wait_until(lambda: not any(running(pid) for pid in workers), "the orphaned workers to exit", 30, 0.05)
        text = server.text()
        assert text.count("shutting down: NOT_SERVING") == 2, text  # each drained, none was cut
        shutil.rmtree(server.metrics_dir())  # a supervisor killed outright cannot remove it


def test_workers_that_cannot_start_make_the_supervisor_fail(repo: Path, tmp_path: Path, redis_url: str) -> None:
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--workers", "2", "--port", "0"]
    cmd += ["--model-repo", str(repo), "--model-name", "missing", "--redis-url", redis_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERREC_")}
    env["HYPERREC_PROFILE_SECRET"] = SECRET
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2  # as a single process's start-up failure
    assert "has no versions" in done.stderr.decode()  # the worker's reason
    assert "exited with code 2 during start-up, before any was ready" in done.stderr.decode()


def test_a_metrics_port_in_use_stops_the_supervisor_before_any_worker(repo: Path, redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--workers", "2", "--port", "0"]
        cmd += ["--model-repo", str(repo), "--model-name", "toy", "--redis-url", redis_url]
        cmd += ["--metrics-port", str(taken.getsockname()[1])]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERREC_")}
        env["HYPERREC_PROFILE_SECRET"] = SECRET
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 2
    assert "metrics_port: cannot listen on" in done.stderr.decode()
    assert "started (pid" not in done.stderr.decode()


def test_worker_count() -> None:
    assert worker_count(load_config(env={}, workers=0)) == 1  # the in-process store is one per process
    assert worker_count(load_config(env={}, workers=3, redis_url="redis://x", profile_secret=SECRET)) == 3
    auto = load_config(env={}, workers=0, redis_url="redis://x", profile_secret=SECRET)
    assert worker_count(auto) == usable_cores()


def test_usable_cores_follow_the_cgroup_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == cores
    cpu_max.write_text("50000 100000\n")  # half a CPU: still one worker
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{100000 * (cores + 8)} 100000\n")  # a quota above the affinity
    assert usable_cores(cpu_max) == cores
    assert usable_cores(tmp_path / "absent") == cores
    with pytest.raises(ConfigError, match="workers > 1 needs redis_url"):
        load_config(env={}, workers=2)


def mapped_here(path: Path) -> bool:
    """Whether this process maps `path` (so every process serving the file shares its pages)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize(
    ("params", "mapped"),
    [(IndexParams(), True), (IndexParams("ivf", nlist=8, nprobe=8), False), (IndexParams("ivfpq", 8, 8), False)],
)
def test_flat_index_files_are_memory_mapped_ivf_ones_copied_all_search_the_same(
    params: IndexParams, mapped: bool, tmp_path: Path
) -> None:
    """Flat indexes are shared by mapping their file; IVF ones are read into memory (a mapped IVF index searched
    markedly slower: see faiss_common.MMAP_FLAGS)."""
    vectors = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    built = registry.build(vectors, params)
    built.save(tmp_path / "index.faiss")
    loaded = registry.load(tmp_path / "index.faiss", params, "cpu")
    assert mapped_here(tmp_path / "index.faiss") == mapped
    queries = vectors[:20]
    assert np.array_equal(loaded.search(queries, 10)[1], built.search(queries, 10)[1])
    assert loaded.nbytes == (tmp_path / "index.faiss").stat().st_size
    loaded.save(tmp_path / "copy.faiss")  # a mapped index saves as a whole file, not a reference to its file
    copy = registry.load(tmp_path / "copy.faiss", params, "cpu")
    assert np.array_equal(copy.search(queries, 10)[1], built.search(queries, 10)[1])


def test_bundle_embeddings_and_index_are_memory_mapped(repo: Path) -> None:
    bundle = Bundle.load(repo / "toy" / "1", index_device="cpu")
    assert mapped_here(bundle.directory / EMBEDDINGS) and mapped_here(bundle.directory / INDEX)
    assert not bundle.item_embeddings.flags.writeable
