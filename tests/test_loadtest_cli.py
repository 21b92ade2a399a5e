"""`hyperrec loadtest` end to end against a test server: results, report and the exit codes of a verdict."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import redis

from hyperrec.app.cli import main
from hyperrec.core.profile import Profile
from tests.helpers import publish_toy, wait_until_async
from tests.serving import TEST_SECRET, running_server

ROOT = Path(__file__).parent.parent  # benchmarks/ is run from the repository root, not installed


async def test_loadtest_command_reports_and_exits_by_the_slo_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish_toy(tmp_path / "repo", model_name="toy")
    generous, strict = tmp_path / "generous.yaml", tmp_path / "strict.yaml"
    generous.write_text("latency_ms: {p50: 2000, p99: 5000}\nmax_error_rate: 0.01\nmin_achieved_ratio: 0.5\n")
    strict.write_text("latency_ms: {p50: 0.001}\nmax_error_rate: 0.0\n")
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("k: 5\nunknown_user_share: 0.5\ncontexts:\n  - {device: mobile, weight: 1}\n")
    async with running_server(tmp_path / "repo", "toy") as running:
        base = ["loadtest", "--target", f"127.0.0.1:{running.port}", "--rate", "80", "--duration", "1"]
        base += ["--warmup", "0.2", "--scenario", str(scenario)]
        passed = await asyncio.to_thread(main, [*base, "--slo", str(generous), "--out", str(tmp_path / "ok")])
        out = capsys.readouterr().out
        breached = await asyncio.to_thread(main, [*base, "--slo", str(strict), "--out", str(tmp_path / "bad")])
        out_bad = capsys.readouterr().out
    assert passed == 0 and "SLO met" in out and "achieved" in out
    assert breached == 1 and "SLO breached" in out_bad
    result = json.loads((tmp_path / "ok" / "result.json").read_text())
    assert result["offered"] == 80 and result["status_counts"] == {"OK": 80}
    assert result["settings"]["scenario"]["k"] == 5 and result["latency_ms"]["p99"] > 0
    html = (tmp_path / "ok" / "report.html").read_text()
    assert "SLO met" in html and html.count("data:image/png;base64,") == 3
    for png in ("latency_over_time.png", "latency_histogram.png", "achieved_rate.png"):
        assert (tmp_path / "bad" / png).read_bytes().startswith(b"\x89PNG")


def test_loadtest_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_slo = tmp_path / "bad.yaml"
    bad_slo.write_text("latency_ms: {p42: 1}\n")
    assert main(["loadtest", "--rate", "10", "--slo", str(bad_slo)]) == 2
    assert "p42" in capsys.readouterr().err
    assert main(["loadtest", "--rate", "-5"]) == 2
    assert main(["loadtest", "--phases", "10:1,20"]) == 2
    assert "'20' is not RATE:SECONDS" in capsys.readouterr().err


async def test_loadtest_phases_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--phases` runs the rates one after another, measures their summed duration, marks each start on the
    timeline and prints each refusal status's time from its send."""
    publish_toy(tmp_path / "repo", model_name="toy")
    async with running_server(tmp_path / "repo", "toy", max_in_flight=1) as running:
        args = ["loadtest", "--target", f"127.0.0.1:{running.port}", "--phases", "40:0.5,1000:0.5,40:0.5"]
        args += ["--warmup", "0", "--deadline-ms", "30000", "--out", str(tmp_path / "out")]
        code = await asyncio.to_thread(main, args)
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["duration_s"] == 1.5 and result["offered"] == 20 + 500 + 20
    assert [e["label"] for e in result["events"]] == ["rate 40/s", "rate 1000/s", "rate 40/s"]
    assert result["status_counts"]["RESOURCE_EXHAUSTED"] > 0
    assert "RESOURCE_EXHAUSTED from send: p50" in out and "within 10 ms" in out


def test_capacity_search_stops_at_the_first_breach_and_reports_the_last_passing_rate() -> None:
    from hyperrec.loadtest.capacity import capacity_table, search
    from hyperrec.loadtest.results import RunResult
    from hyperrec.loadtest.runner import LoadTestSettings
    from hyperrec.loadtest.slo import parse_slo

    def fake_run(settings: LoadTestSettings) -> RunResult:
        """Latency grows with the rate: 1 ms per 100 requests/s."""
        assert settings.rate is not None
        result = RunResult({}, 1.0)
        for _ in range(int(settings.rate)):
            result.scheduled(0)
            result.add(0, settings.rate / 100 / 1e3, "OK")
        return result

    objectives = parse_slo({"latency_ms": {"p99": 5}}, "inline")
    capacity, steps = search(LoadTestSettings(target="x", rate=1.0), [800, 200, 400, 1000], objectives, fake_run)
    assert capacity == 400 and [s.rate for s in steps] == [200, 400, 800]  # 1000 never run
    assert [s.passed for s in steps] == [True, True, False]
    assert "capacity: 400/s meets the SLO" in capacity_table(capacity, steps)


async def test_loadtest_capacity_search_against_a_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish_toy(tmp_path / "repo", model_name="toy")
    generous = tmp_path / "slo.yaml"
    generous.write_text("latency_ms: {p99: 5000}\n")
    async with running_server(tmp_path / "repo", "toy") as running:
        args = ["loadtest", "--target", f"127.0.0.1:{running.port}", "--rates", "40,80", "--duration", "0.5"]
        args += ["--warmup", "0.1", "--slo", str(generous), "--out", str(tmp_path / "cap")]
        assert await asyncio.to_thread(main, args) == 0
    assert "capacity: 80/s meets the SLO" in capsys.readouterr().out
    summary = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    assert summary["capacity"] == 80 and [s["rate"] for s in summary["steps"]] == [40, 80]
    assert (tmp_path / "cap" / "step-80.json").is_file()


def test_bench_runs_end_to_end_on_a_tiny_catalogue(tmp_path: Path) -> None:
    """`make bench` on 3,000 items: every stage runs and bench.json holds the floors, the ratio and the steps."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "benchmarks.bench", "--items", "3000", "--users", "50", "--rates", "50"]
    args += ["--throughput-rates", "50"]
    args += ["--duration", "1", "--calls", "20", "--repo", str(tmp_path / "repo"), "--out", str(tmp_path / "out")]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    bench = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert bench["items"] == 3000 and bench["in_process_floor_ms"]["p50"] > 0 and bench["grpc_echo_floor_ms"]["p50"] > 0
    assert bench["low_load"]["status_counts"] == {"OK": 50} and bench["ratio_p50_to_floor"] > 0
    assert bench["in_process_floor_paced_ms"]["p50"] > 0 and bench["ratio_p50_to_paced_floor"] > 0
    assert bench["protobuf_us"]["decode_request_us"] > 0 and bench["protobuf_us"]["encode_response_us"] > 0
    assert [step["rate"] for step in bench["steps"]] == [50.0] and "capacity" in done.stdout
    assert bench["unbatched"]["low_load"]["status_counts"] == {"OK": 50}  # the same server, without batching
    assert [step["rate"] for step in bench["unbatched"]["steps"]] == [50.0]
    assert bench["saturation_per_s"] == 50.0 and bench["unbatched"]["saturation_per_s"] == 50.0
    capacity, unbatched = bench["capacity_per_s"], bench["unbatched"]["capacity_per_s"]  # 50/s, or None on a slow day
    assert bench["capacity_ratio_to_unbatched"] == (capacity / unbatched if capacity and unbatched else None)
    swap = bench["model_swap"]  # a version published mid-run and picked up by the watcher
    assert set(swap["status_counts"]) == {"OK"} and swap["events"][0]["ok"] and swap["p99_ratio_to_steady"] > 0
    assert not list((tmp_path / "repo").glob("*/2"))  # the published copy is removed again
    outage = bench["redis_outage"]  # the bench's own Redis, stopped and restarted mid-run
    assert [e["ok"] for e in outage["events"]] == [True, True]
    assert set(outage["status_counts"]) == {"OK"} and outage["fallbacks_during_outage"] > 0


async def test_a_model_swap_and_a_command_mid_run_are_marked_on_the_timeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    publish_toy(repo, model_name="toy", seed=1)
    publish_toy(repo, model_name="toy", seed=2)
    marker = tmp_path / "ran"
    token = "admin-token-0123456789"
    async with running_server(repo, "toy", admin_token=token) as running:
        args = ["loadtest", "--target", f"127.0.0.1:{running.port}", "--rate", "100", "--duration", "1.5"]
        args += ["--warmup", "0.2", "--admin-token", token, "--out", str(tmp_path / "out")]
        args += ["--at", "0.6:activate:toy:1", "--at", f"0.3:command:touch {marker}"]
        assert await asyncio.to_thread(main, args) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    labels = {e["label"]: e for e in result["events"]}
    assert labels["activate toy v1"]["ok"] and labels["activate toy v1"]["detail"] == "active version 1"
    assert labels[f"command: touch {marker}"]["ok"] and marker.exists()
    assert 0.5 <= labels["activate toy v1"]["t"] < 1.2
    assert set(result["model_versions"]) == {"1", "2"}  # answers before and after the swap
    assert result["status_counts"] == {"OK": 150}  # the swap dropped nothing
    assert "activate toy v1" in (tmp_path / "out" / "report.html").read_text()
    assert "activate toy v1 (ok)" in out and "answers by model version: 1:" in out


def test_bad_actions_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "--rate", "10", "--at", "5:explode:now"]) == 2
    assert "KIND one of activate, rollback, command" in capsys.readouterr().err
    assert main(["loadtest", "--rate", "10", "--at", "5:activate:toy"]) == 2


def redis_answers(url: str) -> bool:
    """Whether a redis-server at `url` answers PING (one just started may not listen yet)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2, socket_timeout=0.2)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


async def test_a_redis_outage_mid_run_is_marked_and_answered_degraded_without_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run owns a redis-server, stops it (SHUTDOWN) and starts it again mid-run with command actions: every
    call is still answered OK, the answers during the outage say DEGRADED, and personalization comes back."""
    import shutil

    from tests.conftest import free_port

    repo = tmp_path / "repo"
    publish_toy(repo, model_name="toy", seed=1)
    port = free_port()
    start_redis = f"redis-server --port {port} --save '' --appendonly no --daemonize yes --dir {tmp_path}"
    assert shutil.which("redis-server") and shutil.which("redis-cli")
    await asyncio.to_thread(subprocess.run, shlex.split(start_redis), check=True)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        await wait_until_async(lambda: redis_answers(url), f"redis-server on port {port} to answer")
        async with running_server(
            repo, "toy", redis_url=url, profile_secret=TEST_SECRET, breaker_open_s=0.3, profile_budget_ms=200
        ) as running:
            users = [f"u{i:03d}" for i in range(20)]
            toy = running.app.slot.active
            assert toy is not None
            vector = toy.item_embeddings[3].copy()
            await running.app.store.put_many(
                {u: Profile(user_vector=vector, embedding_space=toy.manifest.embedding_space) for u in users}
            )
            (tmp_path / "users.txt").write_text("\n".join(users))
            args = ["loadtest", "--target", f"127.0.0.1:{running.port}", "--rate", "100", "--duration", "4"]
            args += ["--warmup", "0.2", "--users", str(tmp_path / "users.txt"), "--out", str(tmp_path / "out")]
            args += ["--at", f"1:command:redis-cli -p {port} shutdown nosave", "--at", f"2:command:{start_redis}"]
            assert await asyncio.to_thread(main, args) == 0
    finally:
        stop = ["redis-cli", "-p", str(port), "shutdown", "nosave"]
        await asyncio.to_thread(subprocess.run, stop, capture_output=True, check=False)
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status_counts"] == {"OK": 400}
    assert result["strategies"]["degraded"] > 0 and result["strategies"]["personalized"] > 0
    events = sorted(result["events"], key=lambda e: e["t"])
    assert [e["ok"] for e in events] == [True, True] and "shutdown" in events[0]["label"]
    timeline = {row["t"]: row for row in result["timeline"]}
    assert timeline[0]["fallbacks"] == 0  # before the outage: personalized
    assert timeline[1]["fallbacks"] > 0  # Redis is down from 1 s to 2 s
    assert timeline[3]["fallbacks"] == 0  # a second after the restart the breaker has closed again
    assert "answers by strategy:" in out and f"degraded: {result['strategies']['degraded']}" in out


def test_scale_curve_measures_every_index_type_against_exact_search(tmp_path: Path) -> None:
    """`make scale` on one small catalogue: every index type measured at each candidate count; exact search has
    recall 1 and the approximate ones report theirs."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "benchmarks.scale", "--sizes", "30000", "--candidates", "10,100", "--queries", "10"]
    args += ["--out", str(tmp_path), "--plot", str(tmp_path / "scale.png")]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    kinds = {r["params"]["type"] for r in rows}
    assert kinds == {"flat", "ivf", "hnsw", "ivfpq"}
    assert all(r["recall"] == 1.0 for r in rows if r["params"]["type"] == "flat")
    assert all(0.0 < r["recall"] <= 1.0 and r["p50_ms"] > 0 and r["index_mb"] > 0 for r in rows)
    assert {r["candidates"] for r in rows} == {10, 100}
    assert (tmp_path / "scale.png").stat().st_size > 0 and "| items | index |" in done.stdout


def test_the_bench_rebuilds_a_cached_bundle_of_an_older_format(tmp_path: Path) -> None:
    """A bundle cached by an older release would measure the old loading cost: the bench builds a new one."""
    from benchmarks.bench import ensure_bundle
    from hyperrec.core.bundle import MANIFEST, read_manifest

    model, _ = ensure_bundle(tmp_path, 300, 8, 5)
    version = tmp_path / model / "1"
    space = read_manifest(version).embedding_space
    assert ensure_bundle(tmp_path, 300, 8, 5)[0] == model and read_manifest(version).embedding_space == space  # kept
    manifest = json.loads((version / MANIFEST).read_text())
    (version / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    ensure_bundle(tmp_path, 300, 8, 5)
    rebuilt = read_manifest(tmp_path / model / "1")
    assert rebuilt.format_version == 2 and rebuilt.embedding_space != space


def test_the_batching_ab_script_alternates_the_two_servers(tmp_path: Path) -> None:
    import subprocess
    import sys

    args = [
        sys.executable,
        "-m",
        "benchmarks.batching_ab",
        "--items",
        "2000",
        "--rounds",
        "1",
        "--rates",
        "50",
        "--duration",
        "1",
    ]
    done = subprocess.run(
        [*args, "--repo", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["flags"] for r in rows] == [["--batch-max-size", "16"], ["--batch-max-size", "1"]]
    assert all(r["low_p50_ms"] > 0 and list(r["p99_ms_by_rate"]) == ["50"] for r in rows)


def test_pressure_counts_the_cpu_of_a_whole_process_tree() -> None:
    """`make pressure` reads server CPU from /proc for the server's process and everything below it: a grandchild
    that burned 0.3 s of CPU is counted under the top process."""
    import sys

    from benchmarks.pressure import tree_cpu_s

    burn = "import time\nwhile time.process_time() < 0.3: pass\nprint('burnt', flush=True)\ntime.sleep(30)"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "burnt\n"
        assert tree_cpu_s(parent.pid) >= 0.29
        assert tree_cpu_s(2**22 + 7) == 0.0  # no such process
    finally:
        parent.kill()
        parent.wait()
