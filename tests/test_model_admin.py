"""The model repository over a real server: admin auth, load, activate, rollback, unload, the watcher,
partial and corrupt versions, and the policy file (shared by several servers: tests/test_shared_policy.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from hyperrec.app.cli import main
from hyperrec.v1 import admin_pb2 as apb
from hyperrec.v1 import admin_pb2_grpc as apb_grpc
from tests.helpers import SERVING, health_status, publish_toy, wait_until_async
from tests.serving import Running, request, running_server

ADMIN = "admin-token-0123456789"
CLIENT = "client-token-0123456789"
AUTH = (("authorization", f"Bearer {ADMIN}"),)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    publish_toy(tmp_path, model_name="toy", seed=1)
    publish_toy(tmp_path, model_name="toy", seed=2)
    return tmp_path


@pytest.fixture
async def served(repo: Path) -> AsyncIterator[Running]:
    async with running_server(repo, "toy", admin_token=ADMIN, auth_tokens=f"ingest:{CLIENT}") as r:
        yield r


def admin(running: Running) -> Any:  # the generated stub's types describe the sync API; this one is grpc.aio's
    return apb_grpc.ModelAdminStub(running.channel)


async def status(running: Running) -> apb.ModelStatus:
    reply = await admin(running).ListModels(apb.ListModelsRequest(), metadata=AUTH, timeout=5)
    model: apb.ModelStatus = reply.models[0]
    return model


def corrupt(version_dir: Path) -> None:
    data = bytearray((version_dir / "ranker.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (version_dir / "ranker.onnx").write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-a-token"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Basic {ADMIN}"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {CLIENT}"),), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_admin_calls_need_the_admin_token(
    served: Running, metadata: tuple[tuple[str, str], ...], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin(served).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=metadata)
    assert err.value.code() == code
    assert (await status(served)).active_version == 2  # nothing changed


@pytest.mark.parametrize(
    ("model", "version", "code"),
    [
        ("../toy", 1, grpc.StatusCode.INVALID_ARGUMENT),
        ("toy/1", 1, grpc.StatusCode.INVALID_ARGUMENT),
        ("..", 1, grpc.StatusCode.INVALID_ARGUMENT),
        ("other", 1, grpc.StatusCode.NOT_FOUND),
        ("toy", 0, grpc.StatusCode.INVALID_ARGUMENT),
        ("toy", 99, grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_bad_model_names_and_versions(served: Running, model: str, version: int, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin(served).LoadVersion(apb.LoadVersionRequest(model=model, version=version), metadata=AUTH, timeout=5)
    assert err.value.code() == code


async def test_the_newest_version_serves_and_activate_pins_then_rollback_returns(served: Running) -> None:
    first = await status(served)
    assert first.active_version == 2 and first.pinned_version == 0 and list(first.available_versions) == [1, 2]
    reply = await admin(served).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
    assert reply.model.active_version == 1 and reply.model.pinned_version == 1
    assert (await served.stub.Recommend(request("u"), timeout=5)).model_version == "1"
    states = {v.version: v.state for v in reply.model.versions}
    assert states == {1: apb.VERSION_STATE_ACTIVE, 2: apb.VERSION_STATE_READY}
    # The watcher keeps the pin even though version 2 is newer.
    assert await served.app.manager.reconcile() == 1
    back = await admin(served).Rollback(apb.RollbackRequest(model="toy"), metadata=AUTH)
    assert back.model.active_version == 2 and back.model.pinned_version == 2
    assert (await served.stub.Recommend(request("u"), timeout=5)).model_version == "2"


async def test_unload_frees_a_ready_version_but_never_the_active_one(served: Running) -> None:
    loaded = await admin(served).LoadVersion(apb.LoadVersionRequest(model="toy", version=1), metadata=AUTH)
    assert loaded.status.state == apb.VERSION_STATE_READY and loaded.status.load_ms > 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin(served).UnloadVersion(apb.UnloadVersionRequest(model="toy", version=2), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reply = await admin(served).UnloadVersion(apb.UnloadVersionRequest(model="toy", version=1), metadata=AUTH)
    assert [v.version for v in reply.model.versions] == [2]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin(served).Rollback(apb.RollbackRequest(model="toy"), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # nothing was active before


async def test_watcher_serves_new_versions_and_rejects_corrupt_and_partial_ones(repo: Path) -> None:
    async with running_server(repo, "toy", admin_token=ADMIN, watch_interval_s=0.1) as running:
        running.app.start_watcher()
        v3 = publish_toy(repo, model_name="toy", seed=3)
        await wait_for_status(running, lambda s: s.active_version == 3)
        v4 = publish_toy(repo, model_name="toy", seed=4)
        corrupt(v4)
        partial = repo / "toy" / "5"
        partial.mkdir()
        (partial / "item_ids.json").write_text("[]")
        model = await wait_for_status(running, lambda s: any(v.version == 5 for v in s.versions))
        states = {v.version: v for v in model.versions}
        assert model.active_version == 3
        assert states[4].state == apb.VERSION_STATE_FAILED and "ranker.onnx" in states[4].reason
        assert states[5].state == apb.VERSION_STATE_FAILED and "manifest.json" in states[5].reason
        assert await health_status(running.channel, "hyperrec.v1.Recommender") == SERVING
        assert (await running.stub.Recommend(request("u"), timeout=5)).model_version == "3"
        assert v3.is_dir()


async def test_removed_versions_are_forgotten_and_release_pin_returns_to_the_newest(served: Running) -> None:
    import shutil

    await admin(served).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
    published = publish_toy(served.app.manager.repo, model_name="toy", seed=3)
    assert await served.app.manager.reconcile() == 1  # pinned
    released = await admin(served).ReleasePin(apb.ReleasePinRequest(model="toy"), metadata=AUTH)
    assert released.model.pinned_version == 0
    assert await served.app.manager.reconcile() == int(published.name)
    shutil.rmtree(served.app.manager.repo / "toy" / "2")
    await served.app.manager.reconcile()
    model = await status(served)
    assert [v.version for v in model.versions] == [1, 3] and list(model.available_versions) == [1, 3]


async def test_a_version_failing_then_fixed_is_tried_again(repo: Path) -> None:
    async with running_server(repo, "toy", admin_token=ADMIN) as running:
        bad = publish_toy(repo, model_name="toy", seed=3)
        manifest = (bad / "manifest.json").read_text()
        (bad / "manifest.json").write_text("{ not json")
        assert await running.app.manager.reconcile() == 2
        (bad / "manifest.json").write_text(manifest)  # the manifest changed: worth another try
        assert await running.app.manager.reconcile() == 3


async def test_policy_file_pins_a_version(repo: Path) -> None:
    async with running_server(repo, "toy", admin_token=ADMIN) as running:
        (repo / "toy" / "policy.json").write_text(json.dumps({"version": 1}))
        assert await running.app.manager.reconcile() == 1
        model = await status(running)  # a hand-written file: its path, revision 0, nobody named
        assert model.pinned_version == 1 and model.policy_revision == 0 and model.policy_updated_by == ""
        assert model.policy_source == str(repo / "toy" / "policy.json")
        (repo / "toy" / "policy.json").write_text(json.dumps({"version": "latest?"}))  # broken: ignored
        assert await running.app.manager.reconcile() == 2


async def test_models_cli_lists_activates_and_rolls_back(served: Running, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", f"127.0.0.1:{served.port}", "--token", ADMIN]
    assert await asyncio.to_thread(main, ["models", "activate", *target, "--model", "toy", "--version", "1"]) == 0
    assert "model toy: active 1, pinned 1" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["models", "rollback", *target, "--model", "toy"]) == 0
    assert await asyncio.to_thread(main, ["models", "list", *target]) == 0
    out = capsys.readouterr().out
    assert "model toy: active 2, pinned 2" in out and "ready" in out
    assert f"policy: {served.app.manager.model_dir / 'policy.json'}, revision 2 by " in out  # activate, rollback
    assert 1 in [v.version for v in (await status(served)).versions]  # the version rolled back from stays loaded
    assert await asyncio.to_thread(main, ["models", "unload", *target, "--model", "toy", "--version", "1"]) == 0
    assert [v.version for v in (await status(served)).versions] == [2]
    assert await asyncio.to_thread(main, ["models", "unload", *target, "--model", "toy", "--version", "2"]) == 1
    assert "FAILED_PRECONDITION" in capsys.readouterr().err  # the serving version cannot be unloaded
    bad = ["--target", f"127.0.0.1:{served.port}", "--token", "wrong-token"]
    assert await asyncio.to_thread(main, ["models", "list", *bad]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


async def wait_for_status(
    running: Running, done: Callable[[apb.ModelStatus], bool], timeout_s: float = 10.0
) -> apb.ModelStatus:
    """Poll ListModels until `done(status)` holds; returns that status."""
    seen: list[apb.ModelStatus] = []

    async def reached() -> bool:
        seen.append(await status(running))
        return done(seen[-1])

    await wait_until_async(reached, lambda: f"the model status to change; last seen {seen[-1]}", timeout_s)
    return seen[-1]


async def test_policy_canary_routes_a_fixed_share_of_users_and_can_be_withdrawn(served: Running) -> None:
    policy = served.app.manager.model_dir / "policy.json"
    policy.write_text(json.dumps({"labels": {"stable": 1, "canary": 2}, "canary_percent": 30}))
    assert await served.app.manager.reconcile() == 1
    users = [f"user-{n}" for n in range(300)]

    async def versions() -> dict[str, str]:
        replies = await asyncio.gather(*(served.stub.Recommend(request(u, k=3), timeout=5) for u in users))
        return {u: r.model_version for u, r in zip(users, replies, strict=True)}

    first, again = await versions(), await versions()
    assert first == again  # a user always gets the same version
    share = sum(1 for v in first.values() if v == "2") / len(users)
    assert set(first.values()) == {"1", "2"} and 0.2 < share < 0.4
    model = await status(served)
    assert model.active_version == 1 and model.canary_version == 2 and model.canary_percent == 30
    assert {v.version: v.state for v in model.versions}[2] == apb.VERSION_STATE_CANARY
    policy.write_text(json.dumps({"labels": {"stable": 1}}))
    await served.app.manager.reconcile()
    assert set((await versions()).values()) == {"1"}
    model = await status(served)
    assert model.canary_version == 0 and {v.version: v.state for v in model.versions}[2] == apb.VERSION_STATE_READY


async def test_without_keeping_previous_versions_a_swap_frees_the_old_one(repo: Path) -> None:
    async with running_server(repo, "toy", admin_token=ADMIN, keep_previous_version=False) as running:
        reply = await admin(running).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=1), metadata=AUTH)
        assert [v.version for v in reply.model.versions] == [1]
        back = await admin(running).Rollback(apb.RollbackRequest(model="toy"), metadata=AUTH)  # loads 2 again
        assert back.model.active_version == 2 and [v.version for v in back.model.versions] == [2]


def test_warm_up_replays_recorded_request_shapes_until_latency_settles(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hyperrec.core import compute, pipeline
    from hyperrec.core.bundle import Bundle
    from hyperrec.core.domain import Context, DeviceType, RecommendRequest

    bundle = Bundle.load(repo / "toy" / "1")
    seen: list[RecommendRequest] = []
    real = compute.rank_candidates

    def counting(b: Bundle, uvec: Any, req: RecommendRequest, *args: Any) -> Any:
        seen.append(req)
        return real(b, uvec, req, *args)

    monkeypatch.setattr(pipeline, "rank_candidates", counting)
    shape = RecommendRequest("someone", k=7, context=Context(device=DeviceType.TV), exclude=("item-00001",))
    settled = pipeline.warm_up(bundle, 64, 50, recorded=[shape])
    assert settled > 0
    assert 16 <= len(seen) <= 64 and len(seen) % pipeline.WARM_ROUND == 0  # whole rounds, stopped once settled
    assert all(r.k == 7 and r.context.device == DeviceType.TV and r.exclude == ("item-00001",) for r in seen)


async def test_activating_a_corrupt_version_is_refused_with_its_reason(served: Running) -> None:
    corrupt(publish_toy(served.app.manager.repo, model_name="toy", seed=3))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin(served).ActivateVersion(apb.ActivateVersionRequest(model="toy", version=3), metadata=AUTH)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ranker.onnx" in (err.value.details() or "") and "checksum" in (err.value.details() or "")
    model = await status(served)
    assert model.active_version == 2 and model.pinned_version == 0
