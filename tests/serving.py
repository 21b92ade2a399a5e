"""Start a real hyperrec server on port 0 and talk to it over a real channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from hyperrec.app.config import load_config
from hyperrec.app.lifecycle import HyperrecServer, build_server
from hyperrec.core.profile_store import ProfileStore
from hyperrec.v1 import recommender_pb2 as pb
from hyperrec.v1 import recommender_pb2_grpc as pb_grpc

TEST_SECRET = "serving-test-secret-0123456789"


@dataclass
class Running:
    app: HyperrecServer
    port: int
    channel: grpc.aio.Channel
    stub: Any  # the generated stub's types describe the sync API; this one is grpc.aio's


@asynccontextmanager
async def running_server(
    repo: Path,
    model: str,
    *,
    load: bool = True,
    store: ProfileStore | None = None,
    **overrides: Any,
) -> AsyncIterator[Running]:
    """A started server (model loaded unless load=False) and a stub on a real channel."""
    # A busy test machine must not turn answers UNRANKED; tests of the ranking budget set their own.
    settings: dict[str, Any] = {
        "port": 0,
        "model_repo": repo,
        "model_name": model,
        "warmup_requests": 2,
        "ranking_budget_ms": 60_000,
        # Nor may it shed a test's concurrent calls as load: the adaptive limit stays at max_in_flight unless a
        # test of admission sets min_in_flight itself (the limit never goes below it; capped at max_in_flight).
        "min_in_flight": 64,
    }
    if "redis_url" in overrides:
        # A busy test machine must not turn answers DEGRADED or writes UNAVAILABLE; tests of timeouts set their own.
        settings.update(redis_read_timeout_ms=2000, profile_budget_ms=2000)
    settings.update(overrides)
    config = load_config(env={}, **settings)
    app, port = build_server(config, profile_store=store)
    await app.set_serving(False)
    await app.start()
    if load:
        await app.load_model()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(app, port, channel, pb_grpc.RecommenderStub(channel))
    finally:
        await channel.close()
        await app.stop(grace=0.5, drain=0.0)


def request(user: str, k: int = 10, **context: Any) -> pb.RecommendRequest:
    exclude = context.pop("exclude", ())
    return pb.RecommendRequest(user_id=user, k=k, context=pb.Context(**context), exclude_item_ids=list(exclude))
