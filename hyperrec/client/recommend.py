"""A small synchronous client for the Recommender service (used by `hyperrec recommend`).

The caller describes a call with plain values (`RecommendCall`) and gets plain values back (`Recommendations`),
so the command line never handles protocol messages; `format_table` is what `hyperrec recommend` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from hyperrec.client.connect import Connection
from hyperrec.v1 import recommender_pb2 as pb
from hyperrec.v1 import recommender_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class RecommendCall:
    """One Recommend call as the command line describes it."""

    connection: Connection
    user_id: str
    k: int = 10
    device: str = "unspecified"
    surface: str = "unspecified"
    country: str = ""
    event_time: datetime | None = None
    utc_offset_minutes: int = 0
    exclude: tuple[str, ...] = ()
    features: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 2.0
    include_timings: bool = False
    include_seen: bool = False  # let items of the user's recent history come back


@dataclass(frozen=True)
class RecommendedItem:
    """One item of an answer: its id, the ranker's score and the retrieval stage's score."""

    item_id: str
    score: float
    retrieval_score: float


@dataclass(frozen=True)
class StageTimings:
    """The server's time per stage, in milliseconds (only when the call asked for timings)."""

    profile_ms: float
    retrieval_ms: float
    ranking_ms: float
    total_ms: float


@dataclass(frozen=True)
class Recommendations:
    """A Recommend answer as plain values; `strategy` is the strategy's lower-case name ("cold_start", ...)."""

    model_name: str
    model_version: str
    strategy: str
    request_id: str
    items: tuple[RecommendedItem, ...]
    timings: StageTimings | None


# The context's device and surface choices: the enum names without their prefix, lower case ("mobile", "home")
DEVICES = tuple(v.name.removeprefix("DEVICE_TYPE_").lower() for v in pb.DeviceType.DESCRIPTOR.values)
SURFACES = tuple(v.name.removeprefix("SURFACE_").lower() for v in pb.Surface.DESCRIPTOR.values)


def build_context(
    device: str = "unspecified",
    surface: str = "unspecified",
    country: str = "",
    utc_offset_minutes: int = 0,
    features: Mapping[str, str] | None = None,
    event_time: datetime | None = None,
) -> pb.Context:
    """The Context message for these values; ValueError names an unknown device or surface."""
    context = pb.Context(
        device_type=pb.DeviceType.Value(f"DEVICE_TYPE_{device.upper()}"),
        surface=pb.Surface.Value(f"SURFACE_{surface.upper()}"),
        country=country,
        utc_offset_minutes=utc_offset_minutes,
        features=dict(features or {}),
    )
    if event_time is not None:
        context.event_time.FromDatetime(event_time)
    return context


def build_request(call: RecommendCall) -> pb.RecommendRequest:
    """The RecommendRequest message `call` describes."""
    context = build_context(
        call.device, call.surface, call.country, call.utc_offset_minutes, call.features, call.event_time
    )
    return pb.RecommendRequest(
        user_id=call.user_id,
        k=call.k,
        context=context,
        exclude_item_ids=list(call.exclude),
        include_timings=call.include_timings,
        include_seen_items=call.include_seen,
    )


def recommendations(response: pb.RecommendResponse) -> Recommendations:
    """The plain values of a RecommendResponse."""
    timings = None
    if response.HasField("timings"):
        t = response.timings
        timings = StageTimings(t.profile_ms, t.retrieval_ms, t.ranking_ms, t.total_ms)
    return Recommendations(
        model_name=response.model_name,
        model_version=response.model_version,
        strategy=pb.Strategy.Name(response.strategy).removeprefix("STRATEGY_").lower(),
        request_id=response.request_id,
        items=tuple(RecommendedItem(i.item_id, i.score, i.retrieval_score) for i in response.items),
        timings=timings,
    )


def call_recommend(call: RecommendCall) -> Recommendations:
    """Make the call on a channel of its own; ClientError when the server (or the channel) refuses it."""
    response = call.connection.unary(pb_grpc.RecommenderStub, "Recommend", build_request(call), call.timeout_s)
    return recommendations(response)


def format_table(answer: Recommendations) -> str:
    """The answer as `hyperrec recommend` prints it: a header line, one line per item, the timings if any."""
    lines = [
        f"model {answer.model_name} v{answer.model_version} · strategy {answer.strategy} · request {answer.request_id}",
        f"{'rank':>4}  {'item':<16} {'score':>10} {'retrieval':>10}",
    ]
    for rank, item in enumerate(answer.items, start=1):
        lines.append(f"{rank:>4}  {item.item_id:<16} {item.score:>10.4f} {item.retrieval_score:>10.4f}")
    if answer.timings is not None:
        t = answer.timings
        # total is the pipeline's whole time; what the stages leave is validation, the wait for a compute thread
        # (or a batch) and the hand-offs between the event loop and that thread (docs/api.md, "Timings")
        other = max(0.0, t.total_ms - t.profile_ms - t.retrieval_ms - t.ranking_ms)
        lines.append(
            f"timings ms: profile {t.profile_ms:.2f} · retrieval {t.retrieval_ms:.2f} · "
            f"ranking {t.ranking_ms:.2f} · other {other:.2f} · total {t.total_ms:.2f}"
        )
    return "\n".join(lines)
