"""Pure functions: request validation, context features, pseudonymous keys and profile encoding."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperrec.core.domain import Context, DeviceType, RecommendRequest, RequestLimits, Surface, validate_request
from hyperrec.core.errors import BundleError, InvalidArgument
from hyperrec.core.features import FeatureSpec, daypart, default_feature_spec, encode_context, stable_bucket
from hyperrec.core.profile import CategoryAffinity, Profile
from hyperrec.profiles.keys import (
    Pseudonymizer,
    decode_profile,
    encode_profile_hash,
    encode_recent,
    profile_key,
    recent_key,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
LIMITS = RequestLimits(max_k=50, max_exclusions=10)


def field_of(req: RecommendRequest) -> str | None:
    try:
        validate_request(req, LIMITS, NOW)
    except InvalidArgument as exc:
        return exc.field
    return None


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (RecommendRequest(user_id="", k=5), "user_id"),
        (RecommendRequest(user_id="u" * 257, k=5), "user_id"),
        (RecommendRequest(user_id="é" * 129, k=5), "user_id"),  # 258 bytes
        (RecommendRequest(user_id="u", k=0), "k"),
        (RecommendRequest(user_id="u", k=51), "k"),
        (RecommendRequest(user_id="u", k=5, exclude=tuple(f"i{i}" for i in range(11))), "exclude_item_ids"),
        (RecommendRequest(user_id="u", k=5, request_id="r" * 129), "request_id"),
        (
            RecommendRequest(user_id="u", k=5, context=Context(event_time=datetime(1999, 12, 31, tzinfo=UTC))),
            "context.event_time",
        ),
        (
            RecommendRequest(user_id="u", k=5, context=Context(event_time=NOW + timedelta(hours=25))),
            "context.event_time",
        ),
        (RecommendRequest(user_id="u", k=5, context=Context(utc_offset_minutes=841)), "context.utc_offset_minutes"),
        (RecommendRequest(user_id="u", k=5, context=Context(country="de")), "context.country"),
        (RecommendRequest(user_id="u", k=5, context=Context(features={"": "x"})), "context.features"),
        (RecommendRequest(user_id="u", k=5, context=Context(features={"k": "v" * 257})), "context.features"),
        (RecommendRequest(user_id="u" * 256, k=50, exclude=("a",) * 10, context=Context(country="DE")), None),
    ],
)
def test_validation_names_the_offending_field(req: RecommendRequest, field: str | None) -> None:
    assert field_of(req) == field


@settings(max_examples=200)
@given(
    user_id=st.text(max_size=300),
    k=st.integers(min_value=-5, max_value=80),
    n_excluded=st.integers(min_value=0, max_value=15),
    offset=st.integers(min_value=-1000, max_value=1000),
)
def test_validation_accepts_exactly_the_documented_ranges(user_id: str, k: int, n_excluded: int, offset: int) -> None:
    req = RecommendRequest(
        user_id=user_id, k=k, exclude=("x",) * n_excluded, context=Context(utc_offset_minutes=offset)
    )
    valid = (
        0 < len(user_id.encode("utf-8", "surrogatepass")) <= 256
        and 1 <= k <= 50
        and n_excluded <= 10
        and abs(offset) <= 840
    )
    assert (field_of(req) is None) == valid


def test_context_vector_layout() -> None:
    spec = default_feature_spec(8, country_buckets=4)
    ctx = Context(
        event_time=datetime(2026, 6, 1, 18, 0, tzinfo=UTC),  # a Monday
        utc_offset_minutes=120,  # 20:00 local
        device=DeviceType.MOBILE,
        surface=Surface.SEARCH,
        country="DE",
    )
    vec = encode_context(ctx, spec, NOW)
    assert vec.shape == (spec.context_dim,) and vec.dtype == np.float32
    angle = 2 * math.pi * 20 / 24
    assert vec[0] == pytest.approx(math.sin(angle), abs=1e-6)
    assert vec[1] == pytest.approx(math.cos(angle), abs=1e-6)
    device = vec[4:9]
    assert device.tolist() == [0, 1, 0, 0, 0]
    surface = vec[9:15]
    assert surface.tolist() == [0, 0, 0, 1, 0, 0]
    country = vec[15:]
    assert country.sum() == 1 and country[stable_bucket("DE", 4)] == 1
    assert daypart(ctx.local_time(NOW)) == "evening"


def test_missing_event_time_means_now_and_empty_country_uses_slot_zero() -> None:
    spec = default_feature_spec(4, country_buckets=4)
    assert np.array_equal(encode_context(Context(), spec, NOW), encode_context(Context(event_time=NOW), spec, NOW))
    assert encode_context(Context(), spec, NOW)[15] == 1.0


def test_feature_spec_json_round_trip_and_validation() -> None:
    spec = default_feature_spec(8)
    assert FeatureSpec.from_json(spec.to_json()) == spec
    broken = spec.to_json()
    broken["context_dim"] = 3
    with pytest.raises(BundleError, match="context_dim"):
        FeatureSpec.from_json(broken)
    broken = spec.to_json()
    broken["context"][0]["source"] = "minute_of_hour"
    with pytest.raises(BundleError, match="hour_of_day"):
        FeatureSpec.from_json(broken)


@given(st.text(min_size=1, max_size=64))
def test_stable_bucket_is_in_range(value: str) -> None:
    assert 1 <= stable_bucket(value, 16) <= 16


def test_keys_carry_a_keyed_hash_never_the_user_id() -> None:
    a = Pseudonymizer(b"0123456789abcdef-secret-a")
    b = Pseudonymizer(b"0123456789abcdef-secret-b")
    key = a.user_key("alice@example.com")
    assert len(key) == 64 and "alice" not in key
    assert key == a.user_key("alice@example.com") != b.user_key("alice@example.com")
    assert profile_key(key) == f"hr:{{{key}}}:profile"
    assert recent_key(key).startswith(f"hr:{{{key}}}")  # same hash tag: one cluster slot
    assert "0123456789abcdef" not in repr(a)
    with pytest.raises(ValueError):
        Pseudonymizer(b"short")


# Strings as they can arrive: protobuf strings are valid UTF-8, so never lone surrogates.
WIRE_TEXT = st.characters(codec="utf-8")


@settings(max_examples=100)
@given(
    vector=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64) | st.none(),
    recent=st.lists(
        st.tuples(st.text(WIRE_TEXT, min_size=1, max_size=20), st.floats(min_value=0, max_value=1e6)), max_size=10
    ),
    updated=st.floats(min_value=0, max_value=4e9),
    categories=st.dictionaries(
        st.text(WIRE_TEXT, min_size=1, max_size=12),
        st.builds(CategoryAffinity, st.floats(min_value=0, max_value=1e9), st.floats(min_value=0, max_value=4e9)),
        max_size=5,
    ),
    counts=st.dictionaries(st.sampled_from(["view", "click", "purchase"]), st.integers(1, 10**9)),
    interests=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x1f"), min_size=1), max_size=4),
)
def test_profile_encoding_round_trips(
    vector: list[float] | None,
    recent: list[tuple[str, float]],
    updated: float,
    categories: dict[str, CategoryAffinity],
    counts: dict[str, int],
    interests: list[str],
) -> None:
    """Every field survives the Redis encoding exactly (item ids may contain the separator)."""
    profile = Profile(
        user_vector=None if vector is None else np.array(vector, np.float32),
        embedding_space="space-1" if vector is not None else "",
        recent_items=tuple(item for item, _ in recent),
        recent_weights=tuple(weight for _, weight in recent),
        updated_at=updated,
        categories=categories,
        event_counts=counts,
        last_seen=updated / 2,
        interests=tuple(interests),
    )
    decoded = decode_profile(encode_profile_hash(profile), [encode_recent(i, w) for i, w in recent])
    assert decoded is not None
    assert decoded.recent_items == profile.recent_items and decoded.updated_at == updated
    assert decoded.recent_weights == profile.recent_weights
    assert decoded.categories == categories and decoded.event_counts == counts
    assert decoded.interests == profile.interests and decoded.last_seen == profile.last_seen
    assert decoded.embedding_space == profile.embedding_space
    if vector is None:
        assert decoded.user_vector is None
    else:
        assert decoded.user_vector is not None
        np.testing.assert_array_equal(decoded.user_vector, profile.user_vector)


def test_nothing_stored_decodes_to_none() -> None:
    assert decode_profile({}, []) is None


def test_segment_block_is_a_one_hot_of_the_nearest_centroid() -> None:
    from dataclasses import replace

    from hyperrec.core.features import FeatureBlock, assign_segments

    spec = default_feature_spec(2, country_buckets=4)
    spec = replace(spec, blocks=(*spec.blocks, FeatureBlock("segment", "segment", "user_vector", buckets=3)))
    assert spec.segments == 3 and FeatureSpec.from_json(spec.to_json()) == spec
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    users = np.array([[9.0, 1.0], [1.0, 8.0], [0.5, 0.5]], np.float32)
    assert assign_segments(centroids, users).tolist() == [1, 2, 0]
    vec = encode_context(Context(), spec, NOW, segment=2)
    assert vec[-3:].tolist() == [0, 0, 1]
    assert encode_context(Context(), spec, NOW)[-3:].tolist() == [0, 0, 0]  # no user vector: no segment
