"""A model trained for real (PyTorch → ONNX) on the synthetic data, served over a real channel with Redis.

The generator plants a context effect: MOBILE_CATEGORIES are favoured on mobile and
NIGHT_CATEGORIES at night. The served ranking must move in those directions when only
the request's device or hour changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from hyperrec.v1 import recommender_pb2 as pb
from tests.serving import TEST_SECRET, Running, request, running_server
from training.synthetic import MOBILE_CATEGORIES, NIGHT_CATEGORIES, SyntheticConfig, SyntheticData, generate
from training.train import PublishResult, TrainConfig, train_and_publish

TINY_DATA = SyntheticConfig(n_users=300, n_items=600, n_categories=10, events_per_user=30, seed=11)
TINY_TRAIN = TrainConfig(epochs=8, batch_size=256, seed=5)
USERS = 40
K = 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticData, PublishResult]:
    repo = tmp_path_factory.mktemp("trained")
    data = generate(TINY_DATA)
    return repo, data, train_and_publish(data, repo, "synth", TINY_TRAIN)


@pytest.fixture
async def served(trained: tuple[Path, SyntheticData, PublishResult], redis_url: str) -> AsyncIterator[Running]:
    repo, _, result = trained
    async with running_server(repo, "synth", redis_url=redis_url, profile_secret=TEST_SECRET) as running:
        await running.app.store.put_many(dict(result.profiles))
        yield running


def share_in(data: SyntheticData, item_ids: list[str], categories: tuple[int, ...]) -> float:
    row_of = {item: row for row, item in enumerate(data.item_ids)}
    cats = np.array([data.item_category[row_of[i]] for i in item_ids])
    return float(np.isin(cats, categories).mean())


async def lists_for(running: Running, users: Sequence[str], device: int, hour: int) -> list[list[str]]:
    when = (datetime.now(UTC) - timedelta(days=1)).replace(hour=hour, minute=15)
    out = []
    for user in users:
        req = request(user, k=K, device_type=device)
        req.context.event_time.FromDatetime(when)
        reply = await running.stub.Recommend(req, timeout=10)
        assert reply.strategy == pb.STRATEGY_PERSONALIZED and len(reply.items) == K
        out.append([i.item_id for i in reply.items])
    return out


async def test_device_moves_ranking_toward_mobile_categories(
    served: Running, trained: tuple[Path, SyntheticData, PublishResult]
) -> None:
    _, data, _ = trained
    users = data.user_ids[:USERS]
    mobile = await lists_for(served, users, pb.DEVICE_TYPE_MOBILE, hour=14)
    desktop = await lists_for(served, users, pb.DEVICE_TYPE_DESKTOP, hour=14)
    on_mobile = np.mean([share_in(data, items, MOBILE_CATEGORIES) for items in mobile])
    on_desktop = np.mean([share_in(data, items, MOBILE_CATEGORIES) for items in desktop])
    print(f"mobile-category share: mobile {on_mobile:.2f} desktop {on_desktop:.2f}")
    assert on_mobile > on_desktop + 0.05, (on_mobile, on_desktop)
    assert mobile != desktop


async def test_hour_moves_ranking_toward_night_categories(
    served: Running, trained: tuple[Path, SyntheticData, PublishResult]
) -> None:
    _, data, _ = trained
    users = data.user_ids[:USERS]
    night = await lists_for(served, users, pb.DEVICE_TYPE_DESKTOP, hour=23)
    day = await lists_for(served, users, pb.DEVICE_TYPE_DESKTOP, hour=11)
    at_night = np.mean([share_in(data, items, NIGHT_CATEGORIES) for items in night])
    by_day = np.mean([share_in(data, items, NIGHT_CATEGORIES) for items in day])
    print(f"night-category share: night {at_night:.2f} day {by_day:.2f}")
    assert at_night > by_day + 0.05, (at_night, by_day)


async def test_trained_users_get_personal_lists(
    served: Running, trained: tuple[Path, SyntheticData, PublishResult]
) -> None:
    _, data, _ = trained
    lists = await lists_for(served, data.user_ids[:10], pb.DEVICE_TYPE_MOBILE, hour=14)
    assert len({tuple(items) for items in lists}) == 10


async def test_manifest_records_training_and_parity(trained: tuple[Path, SyntheticData, PublishResult]) -> None:
    from hyperrec.bundle import read_manifest

    _, _, result = trained
    manifest = read_manifest(result.version_dir)
    assert manifest.model_name == "synth" and manifest.item_count == 600
    assert result.parity_max_abs_diff <= 1e-4
