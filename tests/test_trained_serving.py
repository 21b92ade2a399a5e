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

from hyperrec.training.synthetic import MOBILE_CATEGORIES, NIGHT_CATEGORIES, SyntheticConfig, SyntheticData, generate
from hyperrec.training.train import PublishResult, TrainConfig, train_and_publish
from hyperrec.v1 import recommender_pb2 as pb
from tests.serving import TEST_SECRET, Running, request, running_server

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


@pytest.mark.parametrize(
    ("favoured", "boosted", "plain"),
    [
        # (planted categories, context that favours them, context that does not): (device, local hour)
        (MOBILE_CATEGORIES, (pb.DEVICE_TYPE_MOBILE, 14), (pb.DEVICE_TYPE_DESKTOP, 14)),
        (NIGHT_CATEGORIES, (pb.DEVICE_TYPE_DESKTOP, 23), (pb.DEVICE_TYPE_DESKTOP, 11)),
    ],
    ids=["device", "hour"],
)
async def test_context_moves_ranking_in_the_planted_direction(
    served: Running,
    trained: tuple[Path, SyntheticData, PublishResult],
    favoured: tuple[int, ...],
    boosted: tuple[int, int],
    plain: tuple[int, int],
) -> None:
    _, data, _ = trained
    users = data.user_ids[:USERS]
    with_effect = await lists_for(served, users, *boosted)
    without = await lists_for(served, users, *plain)
    share_with = np.mean([share_in(data, items, favoured) for items in with_effect])
    share_without = np.mean([share_in(data, items, favoured) for items in without])
    print(f"planted-category share in top {K}: {share_with:.2f} with the context, {share_without:.2f} without")
    assert share_with > share_without + 0.05, (share_with, share_without)


async def test_trained_users_get_personal_lists(
    served: Running, trained: tuple[Path, SyntheticData, PublishResult]
) -> None:
    _, data, _ = trained
    lists = await lists_for(served, data.user_ids[:10], pb.DEVICE_TYPE_MOBILE, hour=14)
    assert len({tuple(items) for items in lists}) == 10


async def test_manifest_records_training_and_parity(trained: tuple[Path, SyntheticData, PublishResult]) -> None:
    from hyperrec.core.bundle import read_manifest

    _, _, result = trained
    manifest = read_manifest(result.version_dir)
    assert manifest.model_name == "synth" and manifest.item_count == 600
    assert result.parity_max_abs_diff <= 1e-4
