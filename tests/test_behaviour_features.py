"""Behaviour features: the decay arithmetic, and training and serving computing the same ranker inputs.

The parity test builds a log, fits the features on it as the model factory does, publishes a bundle whose
ranker takes them, sends the same events to a real server as RecordEvents (Redis), and checks that the
features the server feeds its ranker equal the ones training computes from the log, and that the served
scores carry exactly them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from hyperrec.core.behaviour import BEHAVIOUR_FEATURES, affinity_arrays, behaviour_raw
from hyperrec.core.bundle import Bundle, BundleContents, ColdStart, publish_bundle
from hyperrec.core.compute import candidate_features
from hyperrec.core.errors import BundleError
from hyperrec.core.features import default_feature_spec
from hyperrec.core.profile import CategoryAffinity
from hyperrec.index import IndexParams
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.redis_store import RedisProfileStore, RedisStoreOptions
from hyperrec.training.behaviour_features import fit_behaviour_features, replay_states
from hyperrec.training.interactions import EVENT_CODE, Interactions, ItemCatalog
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import profiles_pb2_grpc as ppb_grpc
from hyperrec.v1 import recommender_pb2 as pb
from tests.helpers import make_ranker_onnx
from tests.serving import TEST_SECRET, request, running_server

DAY = 86_400.0
HALF_LIFE = 14 * DAY
N_ITEMS, DIM = 60, 8
START = 1_700_000_000


def test_decayed_affinity_share_and_recency_on_known_inputs() -> None:
    names = {"a": 0, "b": 1, "c": 2}
    weights, times = affinity_arrays(
        {
            "a": CategoryAffinity(2.0, 1000.0),
            "b": CategoryAffinity(6.0, 1000.0 - HALF_LIFE),
            "zz": CategoryAffinity(9, 0),
        },
        names,
        3,
    )
    assert math.isnan(times[2]) and weights[2] == 0.0  # "c" never seen; "zz" is not in the vocabulary
    now = 1000.0 + HALF_LIFE  # "a" has decayed to 1, "b" to 1.5
    items = np.array([[[0, -1], [1, -1], [0, 1], [2, -1]]])  # a; b; a and b; c
    raw = behaviour_raw(weights[None], times[None], np.array([now]), items, HALF_LIFE)[0]
    np.testing.assert_allclose(raw[:, 0], np.log1p([1.0, 1.5, 2.5, 0.0]))
    np.testing.assert_allclose(raw[:, 1], [0.4, 0.6, 1.0, 0.0])
    np.testing.assert_allclose(raw[:3, 2], np.log1p([HALF_LIFE / DAY, 2 * HALF_LIFE / DAY, HALF_LIFE / DAY]))
    assert math.isnan(raw[3, 2])  # no event in "c": imputed by the transform


def test_a_user_without_affinities_gets_zero_affinity_and_missing_recency() -> None:
    weights, times = affinity_arrays({}, {"a": 0}, 1)
    raw = behaviour_raw(weights[None], times[None], np.array([5.0]), np.array([[[0]]]), HALF_LIFE)
    assert raw[0, 0, 0] == 0.0 and raw[0, 0, 1] == 0.0 and math.isnan(raw[0, 0, 2])


def make_log(seed: int = 0) -> Interactions:
    """Items in 1-2 of 5 categories; 30 users with events of every type over 60 days."""
    rng = np.random.default_rng(seed)
    item_ids = tuple(f"item-{i:05d}" for i in range(N_ITEMS))
    categories = tuple((f"cat-{i % 5}",) if i % 3 else (f"cat-{i % 5}", f"cat-{(i + 1) % 5}") for i in range(N_ITEMS))
    catalog = ItemCatalog(item_ids, categories, tuple("" for _ in item_ids))
    kinds = ["view", "click", "like", "purchase", "dwell", "rating"]
    users, items, times, types, values = [], [], [], [], []
    for u in range(30):
        for _ in range(int(rng.integers(3, 15))):
            kind = kinds[int(rng.integers(0, len(kinds)))]
            users.append(u)
            items.append(int(rng.integers(0, N_ITEMS)))
            times.append(START + int(rng.integers(0, 60 * 86_400)))
            types.append(EVENT_CODE[kind])
            values.append(
                {"dwell": float(rng.integers(0, 200_000)), "rating": float(rng.integers(1, 11)) / 2}.get(kind, math.nan)
            )
    return Interactions.build(tuple(f"user-{u:02d}" for u in range(30)), catalog, users, items, times, types, values)


def publish_with_behaviour(repo: Path, log: Interactions) -> Path:
    behaviour = fit_behaviour_features(log, log.catalog.categories, HALF_LIFE, sample_events=200)
    spec = replace(
        default_feature_spec(DIM),
        behaviour_features=BEHAVIOUR_FEATURES,
        behaviour_stats=behaviour.stats,
        affinity_half_life_s=HALF_LIFE,
    )
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    contents = BundleContents(
        model_name="beh",
        item_ids=log.catalog.item_ids,
        item_embeddings=emb,
        ranker_onnx=make_ranker_onnx(DIM, spec.context_dim, item_feature_dim=len(BEHAVIOUR_FEATURES)),
        feature_spec=spec,
        cold_start=ColdStart(((log.catalog.item_ids[0], 1.0),)),
        index_params=IndexParams.choose(N_ITEMS),
        embedding_space="beh-space",
        item_categories=log.catalog.categories,
    )
    return publish_bundle(repo, contents)


def events_of(log: Interactions, user: int) -> list[ppb.Event]:
    rows = np.flatnonzero(log.user == user)
    kinds = ["view", "click", "like", "share", "add_to_cart", "purchase", "dwell", "rating"]
    out = []
    for row in rows[np.argsort(log.timestamp[rows], kind="stable")]:
        value = float(log.value[row])
        out.append(
            ppb.Event(
                event_id=f"ev-{row}",
                user_id=log.user_ids[user],
                item_id=log.catalog.item_ids[log.item[row]],
                type=ppb.EventType.Value(f"EVENT_TYPE_{kinds[log.event_type[row]].upper()}"),
                value=0.0 if math.isnan(value) else value,
                event_time=Timestamp(seconds=int(log.timestamp[row])),
            )
        )
    return out


async def test_serving_computes_the_behaviour_features_training_computes(tmp_path: Path, redis_url: str) -> None:
    log = make_log()
    repo = tmp_path / "repo"
    publish_with_behaviour(repo, log)
    training = fit_behaviour_features(log, log.catalog.categories, HALF_LIFE, sample_events=200)
    at_end_w, at_end_t = replay_states(log, training.columns, HALF_LIFE)
    store = RedisProfileStore(RedisStoreOptions(url=redis_url), Pseudonymizer(TEST_SECRET.encode()))
    async with running_server(repo, "beh", redis_url=redis_url, profile_secret=TEST_SECRET) as running:
        bundle = running.app.slot.active
        assert isinstance(bundle, Bundle) and bundle.feature_spec.ranker_feature_dim == 3
        stub = ppb_grpc.ProfilesStub(running.channel)
        for user in range(0, 30, 3):
            reply = await stub.RecordEvents(ppb.RecordEventsRequest(events=events_of(log, user)), timeout=5)
            assert reply.accepted == int((log.user == user).sum()) and not reply.rejected
            profile = await store.get(log.user_ids[user])
            assert profile is not None
            now = datetime.fromtimestamp(START + 75 * DAY, UTC)
            rows = np.arange(N_ITEMS)
            served = candidate_features(bundle, profile, rows, now)
            trained = training.features(
                at_end_w[user : user + 1], at_end_t[user : user + 1], [now.timestamp()], rows[None]
            )
            assert served is not None
            np.testing.assert_allclose(served, trained[0], rtol=1e-6, atol=1e-6)
            # The ranker sums its item features into the score: what Recommend returns carries exactly them.
            answer = await running.stub.Recommend(
                request(log.user_ids[user], k=10, event_time=Timestamp(seconds=int(now.timestamp()))), timeout=5
            )
            assert answer.strategy == pb.STRATEGY_PERSONALIZED
            for item in answer.items:
                row = bundle.item_ids.row(item.item_id)
                assert row is not None
                assert item.score - item.retrieval_score == pytest.approx(float(trained[0, row].sum()), abs=1e-4)
    await store.close()


def test_a_bundle_with_behaviour_features_needs_item_categories(tmp_path: Path) -> None:
    log = make_log()
    version = publish_with_behaviour(tmp_path / "repo", log)
    (version / "item_categories.json").unlink()
    manifest = (version / "manifest.json").read_text()
    (version / "manifest.json").write_text(manifest.replace('"item_categories.json"', '"item_categories.gone"'))
    with pytest.raises(BundleError, match=r"item_categories\.json"):
        Bundle.load(version)


async def test_a_half_life_other_than_the_models_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    publish_with_behaviour(tmp_path / "repo", make_log())
    with caplog.at_level(logging.WARNING):
        async with running_server(tmp_path / "repo", "beh", affinity_half_life_days=7.0) as running:
            publish_with_behaviour(tmp_path / "repo", make_log())
            await running.app.manager.reconcile()  # a version the watcher swaps in is checked the same way
    warned = [r.getMessage() for r in caplog.records if "half-life of 14.00 days, profiles use 7.00" in r.getMessage()]
    assert any("version 1 " in m for m in warned) and any("version 2 " in m for m in warned)
