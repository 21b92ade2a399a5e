"""The command line over real processes and channels: `hyperrec serve` and `hyperrec recommend`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from hyperrec.app.cli import main
from tests.conftest import free_port
from tests.helpers import publish_toy, wait_serving
from tests.serving import running_server


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cli-repo")
    publish_toy(repo, n_items=200, dim=8)
    return repo


async def test_recommend_prints_a_ranked_table(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_server(repo, "toy") as running:
        argv = ["recommend", "--target", f"127.0.0.1:{running.port}", "--user", "nobody", "--k", "3", "--timings"]
        code = await asyncio.to_thread(main, argv)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith("model toy v1 · strategy cold_start")
    assert [line.split()[1] for line in out[2:5]] == ["item-00000", "item-00001", "item-00002"]
    stages = dict(part.rsplit(" ", 1) for part in out[5].removeprefix("timings ms: ").split(" · "))
    assert list(stages) == ["profile", "retrieval", "ranking", "other", "total"]
    parts = sum(float(stages[name]) for name in ("profile", "retrieval", "ranking", "other"))
    assert parts == pytest.approx(float(stages["total"]), abs=0.02)  # the printed parts add up to the total


async def test_recommend_reports_the_status_code(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_server(repo, "toy") as running:
        argv = ["recommend", "--target", f"127.0.0.1:{running.port}", "--user", "u", "--k", "1000"]
        code = await asyncio.to_thread(main, argv)
    assert code == 1
    assert capsys.readouterr().err.startswith("error: INVALID_ARGUMENT: k: must be between 1 and 100")


def test_serve_process_becomes_serving_answers_and_drains_on_sigterm(repo: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--port", str(port), "--model-repo", str(repo)]
    proc = subprocess.Popen([*cmd, "--model-name", "toy", "--grace-s", "1"], stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}")
        assert main(["recommend", "--target", f"127.0.0.1:{port}", "--user", "x", "--k", "2"]) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read() if proc.stderr else ""
    assert "model toy: version 1 active" in log and "shutting down" in log


def test_bad_config_exits_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--redis-url", "redis://127.0.0.1:1/0"]) == 2
    assert "profile_secret" in capsys.readouterr().err


def test_train_command_publishes_a_version_and_profiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--synthetic", "--users", "150", "--items", "300", "--epochs", "2"]
    argv += ["--model-repo", str(tmp_path), "--model", "cli", "--profiles-out", str(tmp_path / "p.npz")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"published {tmp_path / 'cli' / '1'}" in out and "wrote 150 profiles" in out
    assert (tmp_path / "cli" / "1" / "manifest.json").is_file()


def test_demo_trains_serves_personalized_answers_and_stops_on_ctrl_c(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`hyperrec demo` end to end in a scratch directory, shrunk to 200 users and 300 items: it serves
    personalized answers, prints an admin token that `hyperrec models list` works with, and pins no version (a
    version published later is served)."""
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "demo", "--port", "0", "--users", "200", "--items", "300"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(9)]
        assert lines[0].startswith("hyperrec demo is serving"), lines
        call = lines[1].split()  # hyperrec recommend --target localhost:PORT --user U ...
        target, user = call[call.index("--target") + 1], call[call.index("--user") + 1]
        with grpc.insecure_channel(target) as channel:
            from hyperrec.v1 import recommender_pb2 as pb
            from hyperrec.v1 import recommender_pb2_grpc as pb_grpc

            reply = pb_grpc.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=10)
        assert reply.strategy == pb.STRATEGY_PERSONALIZED and len(reply.items) == 5
        exports = [line.split("HYPERREC_ADMIN_TOKEN=", 1)[1].split()[0] for line in lines if "ADMIN_TOKEN=" in line]
        assert len(exports) == 1, lines
        capsys.readouterr()
        assert main(["models", "list", "--target", target, "--token", exports[0]]) == 0
        listed = capsys.readouterr().out
        assert "model demo: active 1\n" in listed  # no ", pinned 1": newer versions will be served
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "model_repo" / "demo" / "1" / "manifest.json").is_file()
    assert (tmp_path / "demo-data" / "demo-v1-profiles.npz").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-name", "nosuch"], "has no versions"),
        (["--model-name", "a/b"], "model_name: invalid model name"),
        (["--model-name", "toy", "--seed-profiles", "/nonexistent/profiles.npz"], "cannot read seed profiles"),
    ],
)
def test_start_up_failures_exit_2_with_a_message(repo: Path, args: list[str], message: str) -> None:
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--port", "0", "--model-repo", str(repo), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


async def test_health_of_an_unknown_service_says_why_and_exits_1(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_server(repo, "toy") as running:
        target = f"127.0.0.1:{running.port}"
        serving = await asyncio.to_thread(main, ["health", "--target", target])
        unknown = await asyncio.to_thread(main, ["health", "--target", target, "--service", "nope"])
    captured = capsys.readouterr()
    assert serving == 0 and f"{target} (server): SERVING" in captured.out
    assert unknown == 1
    assert f"{target}: NOT_FOUND: the server keeps no health status for service 'nope'" in captured.err


def test_output_piped_into_a_reader_that_leaves_ends_quietly(repo: Path) -> None:
    """`hyperrec recommend ... | head -1`: when the reader has gone, the command exits 141 (SIGPIPE's code, as a
    shell reports it) without a BrokenPipeError traceback."""
    port = free_port()
    serve = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--port", str(port), "--model-repo", str(repo)]
    server = subprocess.Popen([*serve, "--model-name", "toy"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(f"127.0.0.1:{port}")
        recommend = [sys.executable, "-m", "hyperrec.app.cli", "recommend", "--target", f"127.0.0.1:{port}"]
        reader, writer = os.pipe()
        os.close(reader)  # the reader is gone before the command writes a byte
        try:
            done = subprocess.run(
                [*recommend, "--user", "u", "--k", "5"], stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60
            )
        finally:
            os.close(writer)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert done.returncode == 141
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


@pytest.mark.parametrize("offset", [0, 120, -300, 330, 840, -720])
@pytest.mark.parametrize("hour", [0, 7, 20, 23])
def test_hour_is_the_users_local_hour(hour: int, offset: int) -> None:
    """`--hour 20 --utc-offset 120` asks for 20:30 where the user is (18:30 UTC), not 20:30 UTC."""
    from datetime import timedelta

    from hyperrec.app.cli import _event_time

    when = _event_time(hour, offset)
    assert when is not None and when.utcoffset() == timedelta(0)
    local = when + timedelta(minutes=offset)
    assert (local.hour, local.minute) == (hour, 30)


async def test_the_profile_commands_close_the_loop_recommend_event_recommend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """recommend -> events send -> recommend again, then interests, consent and forget, all from the CLI against a
    real server: each command's output says what the server did, and the next Recommend reflects it."""
    publish_toy(tmp_path, model_name="cats", categories=4)

    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, [argv[0], *argv[1:]])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    async with running_server(tmp_path, "cats") as running:
        target = ["--target", f"127.0.0.1:{running.port}"]
        user = ["--user", "new-user"]
        code, out, _ = await cli("recommend", *target, *user, "--k", "3")
        assert code == 0 and "strategy cold_start" in out
        send = ["events", "send", *target, *user, "--item", "item-00002", "--type", "purchase", "--event-id", "e-1"]
        code, out, _ = await cli(*send)
        assert code == 0 and "event e-1: accepted 1 · duplicates 0" in out
        code, out, _ = await cli(*send)  # the same event id again: counted once
        assert code == 0 and "accepted 0 · duplicates 1" in out
        code, out, _ = await cli("recommend", *target, *user, "--k", "3")
        assert code == 0 and "strategy personalized" in out
        bad = ["events", "send", *target, *user, "--item", "", "--type", "click"]
        code, _, err = await cli(*bad)
        assert code == 1 and "rejected: item_id:" in err

        code, out, _ = await cli("interests", "set", *target, "--user", "fresh", "cat-1", "cat-3")
        assert code == 0 and "interests of fresh: cat-1, cat-3" in out
        code, out, _ = await cli("recommend", *target, "--user", "fresh", "--k", "3")
        assert "strategy interests" in out
        code, _, err = await cli("interests", "set", *target, "--user", "fresh", "no-such-category")
        assert code == 1 and "INVALID_ARGUMENT" in err and "categories[0]" in err

        code, out, _ = await cli("consent", *target, *user, "--deny")
        assert code == 0 and "new-user: opted out of personalization (profile deleted)" in out
        code, out, _ = await cli("recommend", *target, *user, "--k", "3")
        assert "strategy not_personalized" in out
        code, out, _ = await cli("forget", *target, *user)
        assert code == 0 and "new-user: erased" in out and "consent" in out
        code, out, _ = await cli("forget", *target, *user)
        assert code == 0 and "new-user: nothing was stored" in out
        code, out, _ = await cli("recommend", *target, *user, "--k", "3")
        assert "strategy cold_start" in out  # forgotten: a new user again, personalization allowed by default
