"""A small synchronous client for the Recommender service (used by `hyperrec recommend`)."""

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


def build_request(call: RecommendCall) -> pb.RecommendRequest:
    context = pb.Context(
        device_type=pb.DeviceType.Value(f"DEVICE_TYPE_{call.device.upper()}"),
        surface=pb.Surface.Value(f"SURFACE_{call.surface.upper()}"),
        country=call.country,
        utc_offset_minutes=call.utc_offset_minutes,
        features=dict(call.features),
    )
    if call.event_time is not None:
        context.event_time.FromDatetime(call.event_time)
    return pb.RecommendRequest(
        user_id=call.user_id,
        k=call.k,
        context=context,
        exclude_item_ids=list(call.exclude),
        include_timings=call.include_timings,
    )


def call_recommend(call: RecommendCall) -> pb.RecommendResponse:
    with call.connection.channel() as channel:
        stub = pb_grpc.RecommenderStub(channel)
        response: pb.RecommendResponse = stub.Recommend(
            build_request(call), timeout=call.timeout_s, metadata=call.connection.metadata()
        )
        return response


def format_table(response: pb.RecommendResponse) -> str:
    strategy = pb.Strategy.Name(response.strategy).removeprefix("STRATEGY_").lower()
    lines = [
        f"model {response.model_name} v{response.model_version} · strategy {strategy} · request {response.request_id}",
        f"{'rank':>4}  {'item':<16} {'score':>10} {'retrieval':>10}",
    ]
    for rank, item in enumerate(response.items, start=1):
        lines.append(f"{rank:>4}  {item.item_id:<16} {item.score:>10.4f} {item.retrieval_score:>10.4f}")
    if response.HasField("timings"):
        t = response.timings
        lines.append(
            f"timings ms: profile {t.profile_ms:.2f} · retrieval {t.retrieval_ms:.2f} · "
            f"ranking {t.ranking_ms:.2f} · total {t.total_ms:.2f}"
        )
    return "\n".join(lines)
