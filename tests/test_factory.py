"""The model factory end to end on a small generated log in the generic events format.

The log is written to CSV files and loaded through the real loader; the factory
trains (PyTorch), evaluates against baselines, exports with the parity gate and
publishes; the published version loads in the server and serves over a real channel.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hyperrec.app.cli import main
from hyperrec.core.bundle import Bundle, read_manifest
from hyperrec.training.evaluate_bundle import evaluate_bundle
from hyperrec.training.factory import FactoryConfig, FactoryResult, run_factory
from hyperrec.training.history_model import RetrievalConfig
from hyperrec.training.ranker_fit import RankerConfig
from hyperrec.training.synthetic import SyntheticConfig, generate
from hyperrec.v1 import recommender_pb2 as pb
from tests.serving import request, running_server

SMALL = FactoryConfig(
    retrieval=RetrievalConfig(embedding_dim=16, epochs=3, batch_size=256, shared_negatives=256),
    ranker=RankerConfig(events=2000, candidates=50, hard_negatives=10, epochs=2, patience=1),
    als_factors=16,
    als_iterations=5,
    knn_neighbours=20,
)


def _row(bundle: Bundle, item_id: str) -> int:
    row = bundle.item_ids.row(item_id)
    assert row is not None, f"{item_id} is not in the bundle"
    return row


@pytest.fixture(scope="module")
def events_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic log (200 users, 400 items, 10 categories) written as interactions.csv + items.csv."""
    data = generate(SyntheticConfig(n_users=200, n_items=400, n_categories=10, events_per_user=25, seed=4))
    directory = tmp_path_factory.mktemp("events")
    with (directory / "interactions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "item_id", "timestamp", "event_type", "value"])
        for u, i, ts in zip(data.event_user, data.event_item, data.event_ts, strict=True):
            writer.writerow([data.user_ids[u], data.item_ids[i], int(ts), "click", ""])
    with (directory / "items.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "categories", "title"])
        for row, item_id in enumerate(data.item_ids):
            writer.writerow([item_id, data.category_names[data.item_category[row]], f"Item {item_id}"])
        writer.writerow(["never-seen", data.category_names[0], "A brand new item"])  # metadata only
    return directory


@pytest.fixture(scope="module")
def factory(events_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FactoryResult]:
    repo = tmp_path_factory.mktemp("factory-repo")
    yield run_factory(f"events:{events_dir}", repo, "events", SMALL)


def test_report_has_every_metric_for_every_model(factory: FactoryResult) -> None:
    metrics = factory.report["metrics"]
    assert set(metrics) == {"most_popular", "item_knn", "implicit_als", "retrieval", "two_stage"}
    for values in metrics.values():
        for k in (10, 20, 50):
            for name in ("precision", "recall", "ndcg", "map", "hit_rate", "coverage"):
                assert 0.0 <= values[f"{name}@{k}"] <= 1.0
    assert factory.report["verdict"]["ndcg@10"]["best_baseline"] in {"most_popular", "item_knn", "implicit_als"}
    assert factory.report["ann"][f"recall@{SMALL.ranker.candidates}"] == 1.0  # small catalogue: exact index


def test_models_learn_something_from_the_planted_tastes(factory: FactoryResult) -> None:
    """Users have category tastes; the trained retrieval must beat a random ranking by a wide margin."""
    metrics = factory.report["metrics"]
    random_recall_at_50 = 50 / 401
    assert metrics["retrieval"]["recall@50"] > 1.5 * random_recall_at_50
    assert metrics["two_stage"]["recall@50"] > 1.5 * random_recall_at_50


def test_manifest_records_data_code_split_and_parity(factory: FactoryResult, events_dir: Path) -> None:
    manifest = read_manifest(factory.version_dir)
    training = manifest.training
    assert training["dataset"] == f"events:{events_dir}"
    assert len(training["data"]["fingerprint"]) == 64
    assert training["code_version"].startswith("0.1.0+")
    assert training["split"]["kind"] == "temporal"
    assert training["parity_max_abs_diff"] <= 1e-4
    assert manifest.item_count == 401


def test_item_without_interactions_gets_a_vector_from_its_metadata(factory: FactoryResult) -> None:
    bundle = Bundle.load(factory.version_dir)
    vector = bundle.item_embeddings[_row(bundle, "never-seen")]
    assert np.linalg.norm(vector) > 0


async def test_published_version_serves_personalized_answers(factory: FactoryResult, redis_url: str) -> None:
    repo = factory.version_dir.parent.parent
    user, profile = next(iter(factory.profiles.items()))
    async with running_server(repo, "events", redis_url=redis_url, profile_secret="factory-test-secret-0123") as run:
        await run.app.store.put(user, profile)
        reply = await run.stub.Recommend(request(user, k=10), timeout=10)
    assert reply.strategy == pb.STRATEGY_PERSONALIZED and len({i.item_id for i in reply.items}) == 10
    assert [i.score for i in reply.items] == sorted((i.score for i in reply.items), reverse=True)
    assert reply.model_name == "events" and reply.model_version == factory.version_dir.name


def test_evaluate_command_rescores_the_published_version(
    factory: FactoryResult, events_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = factory.version_dir.parent.parent
    out = tmp_path / "eval.json"
    argv = ["evaluate", "--dataset", f"events:{events_dir}", "--model-repo", str(repo), "--model", "events"]
    assert main([*argv, "--out", str(out), "--log-level", "WARNING"]) == 0
    result = json.loads(out.read_text())
    assert result["known_items"] == 401
    served = result["metrics"]["bundle_two_stage"]
    # The published model was retrained on train + validation: it is not the evaluated one, and says so.
    assert factory.report["published_model"]["trained_on"] == "train+validation"
    assert served["ndcg@10"] != factory.report["metrics"]["two_stage"]["ndcg@10"]
    assert "bundle_two_stage" in capsys.readouterr().out


def test_without_retraining_the_bundle_rescores_exactly_as_the_factory_evaluated(
    events_dir: Path, tmp_path: Path
) -> None:
    """The ONNX ranker re-scored from the bundle agrees with the factory's own PyTorch evaluation."""
    factory = run_factory(f"events:{events_dir}", tmp_path, "events", replace(SMALL, retrain_on_all=False))
    assert factory.report["published_model"]["trained_on"] == "train"
    result = evaluate_bundle(f"events:{events_dir}", tmp_path, "events")
    served = result.metrics["bundle_two_stage"]
    assert served["ndcg@10"] == pytest.approx(factory.report["metrics"]["two_stage"]["ndcg@10"], abs=1e-6)


def test_train_command_on_a_dataset_publishes_and_reports(
    events_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dataset", f"events:{events_dir}", "--model", "cli-events", "--epochs", "2"]
    argv += ["--model-repo", str(tmp_path / "repo"), "--report-dir", str(tmp_path / "reports"), "--log-level", "ERROR"]
    argv += ["--profiles-out", str(tmp_path / "profiles.npz")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| two_stage |" in out and "ndcg@10: two-stage" in out
    report = json.loads((tmp_path / "reports" / "cli-events-v1.json").read_text())
    assert report["config"]["retrieval"]["epochs"] == 2
    assert (tmp_path / "reports" / "cli-events-v1.md").read_text().startswith("| model |")
    assert Bundle.load(tmp_path / "repo" / "cli-events" / "1").model_name == "cli-events"
    assert (tmp_path / "profiles.npz").is_file()


def test_bundle_carries_item_features_as_of_its_cut_off(factory: FactoryResult) -> None:
    """The served item features are the training transform applied at the end of the history (train + validation)."""
    bundle = Bundle.load(factory.version_dir)
    spec = bundle.feature_spec
    assert spec.item_features[:4] == ("log_count", "log_count_30d", "log_days_since_first", "log_days_since_last")
    assert bundle.item_features is not None and bundle.item_features.shape == (401, spec.item_feature_dim)
    assert set(spec.item_feature_stats) == set(spec.item_features[:4])
    never_seen = bundle.item_features[_row(bundle, "never-seen")]
    stats = spec.item_feature_stats["log_count"]
    assert never_seen[0] == pytest.approx((0.0 - stats["mean"]) / stats["std"], rel=1e-5)  # zero events, standardised


def test_bundle_carries_behavioural_segments_used_as_a_ranker_feature(factory: FactoryResult) -> None:
    bundle = Bundle.load(factory.version_dir)
    spec = bundle.feature_spec
    assert spec.segments == SMALL.segments
    assert spec.blocks[-1].kind == "segment" and spec.blocks[-1].width == SMALL.segments
    assert bundle.segments is not None and bundle.segments.shape == (SMALL.segments, spec.embedding_dim)
    assert "segments.npy" in read_manifest(factory.version_dir).files


def test_published_bundle_carries_behaviour_features_categories_and_segment_lists(factory: FactoryResult) -> None:
    from hyperrec.core.behaviour import BEHAVIOUR_FEATURES
    from hyperrec.core.bundle import Bundle, segment_key

    bundle = Bundle.load(factory.version_dir)
    spec = bundle.feature_spec
    assert spec.behaviour_features == BEHAVIOUR_FEATURES and spec.affinity_half_life_s == 14 * 86_400.0
    assert set(spec.behaviour_stats) == set(BEHAVIOUR_FEATURES)
    assert bundle.categories is not None and bundle.segments is not None
    lists = [bundle.cold_start.for_segment(k) for k in range(len(bundle.segments))]
    assert sum(1 for items in lists if items) >= 2  # segments with users have their own popular items
    assert all(item in bundle.item_ids for items in lists for item, _ in items)
    assert segment_key(0) == "segment=0"
