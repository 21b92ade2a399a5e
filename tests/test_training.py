"""Tests of the training package: synthetic data, training, ONNX export and parity, publishing.

Expensive work (training and publishing a tiny model twice, exporting a
foreign ranker) happens once per module in fixtures.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from hyperrec.core.bundle import Bundle, list_versions
from hyperrec.core.domain import Context, DeviceType, Surface, validate_context
from hyperrec.core.features import default_feature_spec, encode_context
from hyperrec.training import train as train_module
from hyperrec.training.export import ParityError, check_parity, export_ranker_onnx
from hyperrec.training.networks import Ranker
from hyperrec.training.synthetic import (
    END_TIMESTAMP,
    MOBILE_CATEGORIES,
    NIGHT_CATEGORIES,
    SyntheticConfig,
    SyntheticData,
    generate,
    is_night_hour,
)
from hyperrec.training.train import PublishResult, TrainConfig, build_cold_start, train, train_and_publish

TINY_DATA = SyntheticConfig(n_users=300, n_items=600, n_categories=10, events_per_user=30, seed=7)
TINY_TRAIN = TrainConfig(epochs=8, batch_size=256, seed=3)
MODEL = "tiny"


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    """The tiny synthetic data set shared by the module."""
    return generate(TINY_DATA)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository for this module."""
    return tmp_path_factory.mktemp("model_repo")


@pytest.fixture(scope="module")
def published(data: SyntheticData, repo: Path) -> tuple[PublishResult, PublishResult]:
    """Two consecutive publishes of the tiny model into the same repository."""
    first = train_and_publish(data, repo, MODEL, TINY_TRAIN)
    second = train_and_publish(data, repo, MODEL, TINY_TRAIN)
    return first, second


@pytest.fixture(scope="module")
def bundle(published: tuple[PublishResult, PublishResult]) -> Bundle:
    """The first published version, loaded the way the server loads it."""
    return Bundle.load(published[0].version_dir)


@pytest.fixture(scope="module")
def foreign_onnx() -> bytes:
    """ONNX bytes of a freshly initialised ranker with the tiny model's shapes."""
    dim = TINY_TRAIN.embedding_dim
    context_dim = default_feature_spec(dim, TINY_TRAIN.country_buckets).context_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        ranker = Ranker(dim, context_dim, TINY_TRAIN.hidden)
    return export_ranker_onnx(ranker, dim, context_dim)


def _category_share(data: SyntheticData, categories: tuple[int, ...], events: npt.NDArray[np.bool_]) -> float:
    """Share of the selected events whose item is in `categories`."""
    in_categories = np.isin(data.item_category[data.event_item], categories)
    return float(in_categories[events].mean())


def test_generator_is_deterministic_per_seed(data: SyntheticData) -> None:
    again = generate(TINY_DATA)
    for column in ("event_user", "event_item", "event_ts", "event_device", "event_surface", "event_country"):
        assert np.array_equal(getattr(data, column), getattr(again, column)), column
    other = generate(SyntheticConfig(**{**TINY_DATA.__dict__, "seed": TINY_DATA.seed + 1}))
    assert not np.array_equal(data.event_item[:500], other.event_item[:500])


def test_generated_events_are_well_formed(data: SyntheticData) -> None:
    assert data.n_items == TINY_DATA.n_items and data.n_users == TINY_DATA.n_users
    assert all(re.fullmatch(r"i\d{5}", item) for item in data.item_ids)
    assert all(re.fullmatch(r"u\d{5}", user) for user in data.user_ids)
    assert set(np.unique(data.item_category)) == set(range(TINY_DATA.n_categories))
    assert data.event_ts.max() < END_TIMESTAMP
    assert data.event_ts.min() >= END_TIMESTAMP - (TINY_DATA.days + 1) * 86_400
    assert np.all(np.diff(data.event_user) >= 0)
    same_user = np.diff(data.event_user) == 0
    assert np.all(np.diff(data.event_ts)[same_user] >= 0)
    assert 20 <= data.n_events / data.n_users <= 40
    for row in (0, data.n_events // 2, data.n_events - 1):
        validate_context(data.context(row), data.end_time)


def test_planted_device_effect_is_visible_in_raw_counts(data: SyntheticData) -> None:
    on_mobile = _category_share(data, MOBILE_CATEGORIES, data.event_device == DeviceType.MOBILE)
    on_desktop = _category_share(data, MOBILE_CATEGORIES, data.event_device == DeviceType.DESKTOP)
    assert on_mobile > 2 * on_desktop


def test_planted_night_effect_is_visible_in_raw_counts(data: SyntheticData) -> None:
    night = is_night_hour(data.local_hours())
    assert _category_share(data, NIGHT_CATEGORIES, night) > 2 * _category_share(data, NIGHT_CATEGORIES, ~night)


def test_published_bundle_loads(
    published: tuple[PublishResult, PublishResult], bundle: Bundle, data: SyntheticData
) -> None:
    first = published[0]
    assert first.version_dir.parent.name == MODEL and first.version_dir.name == "1"
    assert tuple(bundle.item_ids) == data.item_ids
    assert bundle.manifest.embedding_space == first.embedding_space
    assert bundle.feature_spec == first.train.feature_spec
    assert bundle.index.size == data.n_items
    training = bundle.manifest.training
    assert training["parity_max_abs_diff"] <= TINY_TRAIN.parity_tolerance
    assert training["seed"] == TINY_TRAIN.seed and training["data"]["events"] == data.n_events
    assert 0.0 <= first.train.metrics["hit_rate@20_retrieval"] <= 1.0


def test_publishing_twice_yields_versions_one_and_two(
    published: tuple[PublishResult, PublishResult], repo: Path
) -> None:
    assert [result.version for result in published] == [1, 2]
    assert list_versions(repo, MODEL) == [1, 2]
    assert published[0].embedding_space != published[1].embedding_space


def test_ranker_learned_the_device_effect(
    published: tuple[PublishResult, PublishResult], bundle: Bundle, data: SyntheticData
) -> None:
    """Scored through ONNX Runtime as the server does, mobile categories gain on mobile relative to desktop."""
    mobile_items = np.isin(data.item_category, MOBILE_CATEGORIES)
    users = np.stack([p.user_vector for p in published[0].profiles.values() if p.user_vector is not None])

    def lift_and_share(device: DeviceType) -> tuple[float, float]:
        ctx = Context(
            event_time=datetime(2025, 5, 20, 13, 0, tzinfo=UTC), device=device, country="GB", surface=Surface.HOME
        )
        vec = encode_context(ctx, bundle.feature_spec, datetime(2025, 6, 1, tzinfo=UTC))
        n = len(users)
        scores = bundle.ranker.score(users, np.repeat(vec[None], n, 0), np.repeat(bundle.item_embeddings[None], n, 0))
        lift = float((scores[:, mobile_items].mean(axis=1) - scores[:, ~mobile_items].mean(axis=1)).mean())
        top = np.argsort(-scores, axis=1)[:, :20]
        return lift, float(mobile_items[top].mean())

    mobile_lift, mobile_share = lift_and_share(DeviceType.MOBILE)
    desktop_lift, desktop_share = lift_and_share(DeviceType.DESKTOP)
    assert mobile_lift > desktop_lift + 0.5
    assert mobile_share > desktop_share + 0.1


def test_cold_start_lists(data: SyntheticData, bundle: Bundle) -> None:
    cold = build_cold_start(data)
    assert len(cold.global_items) == min(1000, len(np.unique(data.event_item)))
    scores = [score for _, score in cold.global_items]
    assert scores == sorted(scores, reverse=True) and 0.99 < sum(scores) <= 1.0 + 1e-9
    assert "device=mobile" in cold.segments and "device=mobile|daypart=evening" in cold.segments
    assert all(re.fullmatch(r"device=[a-z]+(\|daypart=(night|morning|afternoon|evening))?", k) for k in cold.segments)
    assert all(0 < len(items) <= 200 for items in cold.segments.values())
    assert bundle.cold_start.to_json() == cold.to_json()
    earlier = build_cold_start(data, now_timestamp=float(np.median(data.event_ts)))
    assert earlier.global_items != cold.global_items


def test_profiles_hold_vectors_and_recent_items(
    published: tuple[PublishResult, PublishResult], data: SyntheticData
) -> None:
    first = published[0]
    assert set(first.profiles) == set(data.user_ids)
    bounds = data.user_bounds()
    for user in (0, 17, data.n_users - 1):
        profile = first.profiles[data.user_ids[user]]
        assert profile.user_vector is not None and profile.user_vector.dtype == np.float32
        assert np.array_equal(profile.user_vector, first.train.user_embeddings[user])
        assert profile.embedding_space == first.embedding_space
        last = int(bounds[user + 1]) - 1
        assert profile.updated_at == float(data.event_ts[last])
        assert profile.recent_items[0] == data.item_ids[int(data.event_item[last])]
        assert len(profile.recent_items) == len(set(profile.recent_items)) <= TINY_TRAIN.recent_items


def test_training_is_reproducible(published: tuple[PublishResult, PublishResult], data: SyntheticData) -> None:
    again = train(data, TINY_TRAIN)
    for earlier in (published[0].train, published[1].train):
        assert np.array_equal(again.item_embeddings, earlier.item_embeddings)
        assert np.array_equal(again.user_embeddings, earlier.user_embeddings)
    for mine, theirs in zip(again.ranker.parameters(), published[0].train.ranker.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_parity_check_accepts_own_export(published: tuple[PublishResult, PublishResult], bundle: Bundle) -> None:
    onnx_bytes = (bundle.directory / "ranker.onnx").read_bytes()
    ranker = published[0].train.ranker
    assert check_parity(ranker, onnx_bytes, TINY_TRAIN.embedding_dim, bundle.feature_spec.context_dim) <= 1e-4


def test_parity_check_rejects_other_ranker(
    published: tuple[PublishResult, PublishResult], bundle: Bundle, foreign_onnx: bytes
) -> None:
    with pytest.raises(ParityError):
        check_parity(published[0].train.ranker, foreign_onnx, TINY_TRAIN.embedding_dim, bundle.feature_spec.context_dim)


def test_parity_failure_blocks_publishing(tmp_path: Path, foreign_onnx: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "export_ranker_onnx", lambda *args: foreign_onnx)
    small = generate(SyntheticConfig(n_users=40, n_items=80, n_categories=10, events_per_user=5, seed=1))
    with pytest.raises(ParityError):
        train_and_publish(small, tmp_path, MODEL, TrainConfig(epochs=1, batch_size=256))
    assert list_versions(tmp_path, MODEL) == []


def test_ranker_output_shape() -> None:
    ranker = Ranker(8, 5, (16,))
    scores = ranker(torch.zeros(3, 8), torch.zeros(3, 5), torch.zeros(3, 7, 8))
    assert scores.shape == (3, 7)
