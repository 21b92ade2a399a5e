"""The asyncio Recommender client the load tester drives: one channel per worker, prebuilt requests, and an
outcome per call instead of an exception, so a hot loop of thousands of calls a second pays for nothing else.

The load tester holds `Request` and `Context` objects as opaque values: it builds them here from plain values
(`build_context` once per scenario context, `new_request` once per request) and hands them back to `recommend`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import grpc

from hyperrec.client.connect import Connection
from hyperrec.client.recommend import build_context
from hyperrec.v1 import recommender_pb2 as pb
from hyperrec.v1 import recommender_pb2_grpc as pb_grpc

Request: TypeAlias = pb.RecommendRequest
Context: TypeAlias = pb.Context
Outcome: TypeAlias = tuple[str, str, str]
"""(status code name, model version that answered, its strategy's lower-case name); both "" unless OK."""

STRATEGY_NAMES = {v.number: v.name.removeprefix("STRATEGY_").lower() for v in pb.Strategy.DESCRIPTOR.values}

__all__ = ["AsyncRecommender", "Context", "Outcome", "Request", "build_context", "new_request", "open_recommender"]


def new_request(user_id: str, k: int, context: Context, exclude: Sequence[str]) -> Request:
    """A Recommend request for `user_id`, asking for `k` items in `context`, without the ids in `exclude`."""
    return pb.RecommendRequest(user_id=user_id, k=k, context=context, exclude_item_ids=exclude)


class AsyncRecommender:
    """Sends prebuilt requests on one open channel, each with the deadline and the connection's token."""

    __slots__ = ("_metadata", "_recommend", "_timeout_s")

    def __init__(self, stub: pb_grpc.RecommenderStub, timeout_s: float, metadata: tuple[tuple[str, str], ...]) -> None:
        self._recommend: Any = stub.Recommend  # a grpc.aio multicallable; the generated types describe the sync one
        self._timeout_s = timeout_s
        self._metadata = metadata

    async def recommend(self, request: Request) -> Outcome:
        """Send one request and wait for its answer; a refused or failed call is an outcome, not an exception."""
        try:
            reply = await self._recommend(request, timeout=self._timeout_s, metadata=self._metadata)
            return "OK", str(reply.model_version), STRATEGY_NAMES.get(reply.strategy, "")
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name), "", ""


@asynccontextmanager
async def open_recommender(connection: Connection, timeout_s: float) -> AsyncIterator[AsyncRecommender]:
    """An AsyncRecommender on a new channel to `connection`, once the channel is ready; closes it on exit."""
    async with connection.aio_channel() as channel:
        client = AsyncRecommender(pb_grpc.RecommenderStub(channel), timeout_s, connection.metadata())
        await channel.channel_ready()
        yield client
