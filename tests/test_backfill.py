"""`hyperrec profiles load`: backfilled profiles equal what live RecordEvents builds, over real Redis."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path

import numpy as np
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from hyperrec.app.cli import main
from hyperrec.core.bundle import Bundle
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.redis_store import RedisProfileStore, RedisStoreOptions
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import profiles_pb2_grpc as ppb_grpc
from tests.helpers import publish_toy
from tests.serving import TEST_SECRET, running_server

TYPES = ("view", "click", "like", "purchase", "dwell", "rating")
START = 1_700_000_000


def write_log(directory: Path, users: int = 40, seed: int = 3) -> list[tuple[str, str, int, str, float]]:
    """A generic-format interactions.csv; events of a user are in time order."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        t = START + int(rng.integers(0, 86_400))
        for _ in range(int(rng.integers(1, 12))):
            t += int(rng.integers(1, 40_000))
            kind = str(rng.choice(TYPES))
            value = {"dwell": float(rng.integers(0, 300_000)), "rating": float(rng.integers(1, 11)) / 2}.get(kind, 0.0)
            rows.append((f"user-{u:03d}", f"item-{int(rng.integers(0, 300)):05d}", t, kind, value))
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "interactions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "item_id", "timestamp", "event_type", "value"])
        for user, item, t, kind, value in rows:
            writer.writerow([user, item, t, kind, value if kind in ("dwell", "rating") else ""])
    return rows


@pytest.fixture
def categorized_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    publish_toy(repo, model_name="toy", categories=5)
    return repo


def _store(url: str) -> RedisProfileStore:
    return RedisProfileStore(RedisStoreOptions(url=url), Pseudonymizer(TEST_SECRET.encode()))


async def test_backfill_writes_every_user_and_matches_live_ingestion(
    tmp_path: Path, categorized_repo: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = write_log(tmp_path / "log")
    users = sorted({r[0] for r in rows})
    args = ["profiles", "load", "--events", f"events:{tmp_path / 'log'}", "--model", "toy"]
    args += ["--model-repo", str(categorized_repo), "--redis-url", redis_url, "--profile-secret", TEST_SECRET]
    assert await asyncio.to_thread(main, args) == 0  # the CLI runs its own event loop
    out = capsys.readouterr().out
    assert f"wrote {len(users)} profiles" in out and "users/s" in out

    store = _store(redis_url)
    backfilled = {u: await store.get(u) for u in users}
    assert all(p is not None and p.user_vector is not None for p in backfilled.values())

    # The same log as live events, through the server, into an empty Redis.
    redis.Redis.from_url(redis_url).flushall()
    async with running_server(categorized_repo, "toy", redis_url=redis_url, profile_secret=TEST_SECRET) as running:
        stub = ppb_grpc.ProfilesStub(running.channel)
        events = []
        for n, (user, item, t, kind, value) in enumerate(rows):
            events.append(
                ppb.Event(
                    event_id=f"e{n}",
                    user_id=user,
                    item_id=item,
                    type=ppb.EventType.Value(f"EVENT_TYPE_{kind.upper()}"),
                    value=value,
                    event_time=Timestamp(seconds=t),
                )
            )
        reply = await stub.RecordEvents(ppb.RecordEventsRequest(events=events), timeout=10)
        assert reply.accepted == len(rows) and not reply.rejected
        bundle = running.app.slot.active
        assert isinstance(bundle, Bundle)
    live = {u: await store.get(u) for u in users}
    await store.close()

    for user in users:
        a, b = backfilled[user], live[user]
        assert a is not None and b is not None
        assert a.recent_items == b.recent_items and a.recent_weights == b.recent_weights
        assert a.event_counts == b.event_counts and a.last_seen == b.last_seen
        assert a.categories.keys() == b.categories.keys()
        for name in a.categories:
            assert a.categories[name].at == b.categories[name].at
            assert a.categories[name].weight == pytest.approx(b.categories[name].weight, rel=1e-12)
        assert a.embedding_space == b.embedding_space == bundle.manifest.embedding_space
        assert a.user_vector is not None and b.user_vector is not None
        np.testing.assert_allclose(a.user_vector, b.user_vector, rtol=1e-5, atol=1e-6)


async def test_backfill_skips_users_who_opted_out(
    tmp_path: Path, categorized_repo: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = write_log(tmp_path / "log", users=5)
    store = _store(redis_url)
    await store.set_consent("user-001", personalization=False)
    args = ["profiles", "load", "--events", f"events:{tmp_path / 'log'}", "--model-repo", str(categorized_repo)]
    args += ["--model", "toy", "--redis-url", redis_url, "--profile-secret", TEST_SECRET, "--batch-size", "2"]
    assert await asyncio.to_thread(main, args) == 0
    assert "wrote 4 profiles (1 users opted out, skipped)" in capsys.readouterr().out
    opted_out = await store.get("user-001")
    kept = await store.get("user-002")
    await store.close()
    assert opted_out is not None and opted_out.opted_out
    assert kept is not None and kept.recent_items and len({r[0] for r in rows}) == 5


def test_backfill_needs_redis(tmp_path: Path, categorized_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_log(tmp_path / "log", users=2)
    args = ["profiles", "load", "--events", f"events:{tmp_path / 'log'}", "--model-repo", str(categorized_repo)]
    assert main([*args, "--model", "toy"]) == 2
    assert "--redis-url" in capsys.readouterr().err
