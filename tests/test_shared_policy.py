"""One model policy for every replica: admin pins, rollbacks, pin releases and canaries written to the shared
repository's policy.json with a compare-and-swap, followed by every server on that repository, kept over a
restart; and the watcher's folder scans and file reads kept off the event loop. Real servers over real channels."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from hyperrec.app.cli import main
from hyperrec.core import model_manager
from hyperrec.core.errors import Aborted
from hyperrec.core.policy import LOCK, POLICY, load_policy, pin_change, read_policy, write_policy
from hyperrec.v1 import admin_pb2 as apb
from hyperrec.v1 import admin_pb2_grpc as apb_grpc
from tests.helpers import publish_toy, wait_until_async
from tests.serving import Running, request, running_server

ADMIN = "admin-token-0123456789"
AUTH = (("authorization", f"Bearer {ADMIN}"),)
WATCH_S = 0.2


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for seed in (1, 2, 3):
        publish_toy(tmp_path, model_name="toy", seed=seed)
    return tmp_path


def policy_file(repo: Path) -> Path:
    return repo / "toy" / POLICY


def admin(running: Running) -> Any:  # the generated stub's types describe the sync API; this one is grpc.aio's
    return apb_grpc.ModelAdminStub(running.channel)


async def status(running: Running) -> apb.ModelStatus:
    reply = await admin(running).ListModels(apb.ListModelsRequest(), metadata=AUTH, timeout=5)
    model: apb.ModelStatus = reply.models[0]
    return model


async def served_version(running: Running) -> str:
    return str((await running.stub.Recommend(request("someone", k=3), timeout=5)).model_version)


async def until_serving(running: Running, version: int, also: Callable[[apb.ModelStatus], bool] = bool) -> None:
    """Poll until the server's active version is `version` (and `also` holds) and a Recommend comes from it."""
    seen: list[apb.ModelStatus] = []

    async def reached() -> bool:
        seen.append(await status(running))
        return seen[-1].active_version == version and also(seen[-1]) and await served_version(running) == str(version)

    await wait_until_async(reached, lambda: f"version {version} to serve; last status {seen[-1] if seen else None}")


@pytest.fixture
async def replicas(repo: Path) -> AsyncIterator[tuple[Running, Running]]:
    """Two servers on the same model repository, each with its watcher running."""
    async with AsyncExitStack() as stack:
        pair = []
        for _ in range(2):
            running = await stack.enter_async_context(
                running_server(repo, "toy", admin_token=ADMIN, watch_interval_s=WATCH_S)
            )
            running.app.start_watcher()
            pair.append(running)
        yield pair[0], pair[1]


async def test_an_activation_on_one_replica_is_served_by_both_after_a_watch_interval(
    repo: Path, replicas: tuple[Running, Running]
) -> None:
    a, b = replicas
    assert (await status(b)).policy_source == "none" and (await status(b)).active_version == 3
    reply = await admin(a).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
    assert reply.model.active_version == 1 and reply.model.pinned_version == 1
    assert reply.model.policy_revision == 1 and reply.model.policy_source == str(policy_file(repo))
    written = json.loads(policy_file(repo).read_text())
    assert written["version"] == 1 and written["revision"] == 1 and written["source"] == "ActivateVersion"
    assert written["updated_by"] == reply.model.policy_updated_by != ""
    await until_serving(b, 1, lambda s: s.pinned_version == 1 and s.policy_revision == 1)

    # A rollback on the other replica is followed by the first one too.
    await admin(b).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=2), metadata=AUTH)
    rolled = await admin(b).Rollback(apb.RollbackRequest(model="toy"), metadata=AUTH)
    assert rolled.model.active_version == 1 and rolled.model.policy_revision == 3
    await until_serving(a, 1, lambda s: s.policy_revision == 3)

    # Releasing the pin anywhere returns both to the newest version.
    released = await admin(a).ReleasePin(apb.ReleasePinRequest(model="toy"), metadata=AUTH)
    assert released.model.pinned_version == 0 and released.model.policy_revision == 4
    assert "version" not in json.loads(policy_file(repo).read_text())
    for running in (a, b):
        await until_serving(running, 3, lambda s: s.pinned_version == 0 and s.policy_revision == 4)


async def test_a_canary_set_on_one_replica_routes_the_same_users_on_both(
    repo: Path, replicas: tuple[Running, Running]
) -> None:
    a, b = replicas
    await admin(a).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=2), metadata=AUTH)
    reply = await admin(a).SetCanary(apb.SetCanaryRequest(model="toy", version=3, percent=40), metadata=AUTH)
    assert reply.model.canary_version == 3 and reply.model.canary_percent == 40 and reply.model.active_version == 2
    assert read_policy(repo / "toy").canary == 3 and read_policy(repo / "toy").stable == 2  # the pin stays
    await until_serving(b, 2, lambda s: s.canary_version == 3 and s.canary_percent == 40)
    users = [f"user-{n}" for n in range(200)]

    async def versions(running: Running) -> dict[str, str]:
        replies = await asyncio.gather(*(running.stub.Recommend(request(u, k=3), timeout=5) for u in users))
        return {u: r.model_version for u, r in zip(users, replies, strict=True)}

    on_a, on_b = await versions(a), await versions(b)
    assert on_a == on_b and set(on_a.values()) == {"2", "3"}
    stopped = await admin(b).SetCanary(apb.SetCanaryRequest(model="toy", version=0), metadata=AUTH)
    assert stopped.model.canary_version == 0
    await until_serving(a, 2, lambda s: s.canary_version == 0)
    assert set((await versions(a)).values()) == {"2"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin(a).SetCanary(apb.SetCanaryRequest(model="toy", version=9, percent=5), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin(a).SetCanary(apb.SetCanaryRequest(model="toy", version=3, percent=101), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert load_policy(repo / "toy").revision == 3  # the refused calls wrote nothing


async def test_a_restarted_server_keeps_the_pin(repo: Path) -> None:
    async with running_server(repo, "toy", admin_token=ADMIN) as first:
        await admin(first).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
    async with running_server(repo, "toy", admin_token=ADMIN) as second:
        model = await status(second)
        assert model.active_version == 1 and model.pinned_version == 1 and model.policy_revision == 1
        assert await served_version(second) == "1"


async def test_model_version_overrides_the_file_on_its_process_until_an_admin_call_there(repo: Path) -> None:
    async with running_server(repo, "toy", admin_token=ADMIN) as a:
        await admin(a).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
        async with running_server(repo, "toy", admin_token=ADMIN, model_version=2) as b:
            assert await b.app.manager.reconcile() == 2  # the override wins over the file's pin of 1
            model = await status(b)
            assert model.pinned_version == 2 and model.policy_revision == 1
            assert load_policy(repo / "toy").policy.stable == 1  # and nothing was written
            reply = await admin(b).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=3), metadata=AUTH)
            assert reply.model.pinned_version == 3 and reply.model.policy_revision == 2  # now the file's pin
            assert load_policy(repo / "toy").policy.stable == 3 and await a.app.manager.reconcile() == 3
            await publish_new(repo)
            assert await b.app.manager.reconcile() == 3  # the file's pin, not the override of 2, holds b
            await admin(b).ReleasePin(apb.ReleasePinRequest(model="toy"), metadata=AUTH)
            assert await b.app.manager.reconcile() == 4 and await a.app.manager.reconcile() == 4


async def publish_new(repo: Path) -> None:
    await asyncio.to_thread(publish_toy, repo, model_name="toy", seed=4)


@contextmanager
def policy_locked(repo: Path) -> Iterator[None]:
    """Hold the policy's writer lock, as a writer on another machine would."""
    fd = os.open(repo / "toy" / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


async def test_concurrent_activations_on_two_replicas_one_wins_the_other_is_aborted(
    repo: Path, replicas: tuple[Running, Running]
) -> None:
    a, b = replicas
    calls: list[asyncio.Task[Any]] = []
    with policy_locked(repo):
        # Both read revision 0, then load and serve their version, then wait for the lock to write.
        for running, version in ((a, 1), (b, 2)):
            req = apb.ActivateVersionRequest(model="toy", version=version)
            calls.append(asyncio.ensure_future(admin(running).ActivateVersion(req, metadata=AUTH, timeout=30)))
        for running, version in ((a, 1), (b, 2)):
            await wait_until_async(partial(status_active, running, version), f"{version} active before the write")
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    won = [o for o in outcomes if isinstance(o, apb.ActivateVersionResponse)]
    lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert lost[0].code() == grpc.StatusCode.ABORTED and "revision" in (lost[0].details() or "")
    winner = won[0].model.active_version
    written = json.loads(policy_file(repo).read_text())  # valid JSON, one write only
    assert written["revision"] == 1 and written["version"] == winner
    assert sorted(p.name for p in (repo / "toy").iterdir() if not p.name.isdigit()) == [LOCK, POLICY]  # no temp
    for running in (a, b):  # the loser returned to the file's pin when it lost
        await until_serving(running, winner, lambda s: s.policy_revision == 1)


async def status_active(running: Running, version: int) -> bool:
    return (await status(running)).active_version == version


def test_a_write_based_on_a_stale_read_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    model_dir = tmp_path / "toy"
    model_dir.mkdir()
    (model_dir / POLICY).write_text(json.dumps({"labels": {"stable": 1, "canary": 2}, "canary_percent": 10}))
    base = load_policy(model_dir)
    assert base.revision == 0 and base.policy.stable == 1 and base.source == str(model_dir / POLICY)
    first = write_policy(model_dir, base, pin_change(3), "replica-a", "ActivateVersion")
    assert first.revision == 1 and first.policy.stable == 3 and first.policy.canary == 2  # the canary is kept
    assert first.fields["labels"] == {"canary": 2} and first.updated_by == "replica-a"
    before = (model_dir / POLICY).read_bytes()
    with pytest.raises(Aborted, match="revision 1"):
        write_policy(model_dir, base, pin_change(4), "replica-b", "ActivateVersion")
    assert (model_dir / POLICY).read_bytes() == before
    # A hand edit that keeps the revision is still a change the next writer must have seen.
    (model_dir / POLICY).write_text(json.dumps({**first.fields, "version": 1}))
    with pytest.raises(Aborted):
        write_policy(model_dir, first, pin_change(4), "replica-b", "ActivateVersion")
    assert write_policy(model_dir, load_policy(model_dir), pin_change(4), "b", "ActivateVersion").revision == 2


async def test_a_corrupt_policy_is_logged_and_ignored_and_an_admin_write_replaces_it(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy_file(repo).write_text("{ not json")
    async with running_server(repo, "toy", admin_token=ADMIN) as running:
        with caplog.at_level(logging.ERROR, logger="hyperrec.core.policy"):
            assert await running.app.manager.reconcile() == 3
        assert any("ignoring" in r.getMessage() and POLICY in r.getMessage() for r in caplog.records)
        model = await status(running)
        assert model.pinned_version == 0 and model.policy_revision == 0
        assert model.policy_source == str(policy_file(repo))
        reply = await admin(running).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
        assert reply.model.policy_revision == 1
        assert json.loads(policy_file(repo).read_text())["version"] == 1


async def test_the_watcher_scans_and_reads_off_the_event_loop(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[tuple[str, bool]] = []

    def recorded(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            threads.append((name, threading.current_thread() is threading.main_thread()))
            return real(*args)

        return call

    for name in ("list_versions", "load_policy", "manifest_fingerprint"):
        monkeypatch.setattr(model_manager, name, recorded(name, getattr(model_manager, name)))
    async with running_server(repo, "toy", admin_token=ADMIN) as running:
        (repo / "toy" / "2" / "manifest.json").write_text("{ broken")  # a failed version: its manifest is re-read
        await admin(running).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError):
            await admin(running).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=2), metadata=AUTH)
        await admin(running).ReleasePin(apb.ReleasePinRequest(model="toy"), metadata=AUTH)
        assert await running.app.manager.reconcile() == 3
    assert {name for name, _ in threads} == {"list_versions", "load_policy", "manifest_fingerprint"}
    assert not [name for name, on_loop in threads if on_loop]


async def test_models_cli_prints_the_policy_and_sets_a_canary(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async with running_server(repo, "toy", admin_token=ADMIN) as running:
        target = ["--target", f"127.0.0.1:{running.port}", "--token", ADMIN]
        assert await asyncio.to_thread(main, ["models", "list", *target]) == 0
        assert "policy: none, revision 0" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["models", "activate", *target, "--model", "toy", "--version", "2"]) == 0
        out = capsys.readouterr().out
        assert f"policy: {policy_file(repo)}, revision 1 by " in out
        canary = ["models", "canary", *target, "--model", "toy", "--version", "3", "--percent", "25"]
        assert await asyncio.to_thread(main, canary) == 0
        assert "active 2, pinned 2, canary 3 for 25% of users" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["models", "release", *target, "--model", "toy"]) == 0
        assert "revision 3" in capsys.readouterr().out


async def test_an_admin_change_that_cannot_be_written_is_refused_and_changes_nothing(repo: Path) -> None:
    (repo / "toy" / LOCK).mkdir()  # the lock cannot be opened for writing, as on a read-only mount (even as root)
    async with running_server(repo, "toy", admin_token=ADMIN) as running:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin(running).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot write" in (err.value.details() or "") and POLICY in (err.value.details() or "")
        model = await status(running)  # it served 1 for the call's duration, then went back to the file's answer
        assert model.active_version == 3 and model.pinned_version == 0 and await served_version(running) == "3"
    assert not policy_file(repo).exists()
