"""The Recommender gRPC servicer: decode, call the pipeline, encode. Nothing else."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc

from hyperrec.domain import MAX_REQUEST_ID_BYTES
from hyperrec.pipeline import Recommender
from hyperrec.v1 import recommender_pb2 as pb
from hyperrec.v1 import recommender_pb2_grpc as pb_grpc
from server.codec import decode_request, encode_response
from server.status import status_for


def new_request_id() -> str:
    return uuid.uuid4().hex


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, pipeline: Recommender) -> None:
        self._pipeline = pipeline

    async def Recommend(  # noqa: N802 - name fixed by the contract
        self,
        request: pb.RecommendRequest,
        context: grpc.aio.ServicerContext[pb.RecommendRequest, pb.RecommendResponse],
    ) -> pb.RecommendResponse:
        request_id = request.request_id or new_request_id()
        # An over-long caller id is rejected by validation; messages then quote one of ours.
        quoted_id = request_id if len(request_id.encode()) <= MAX_REQUEST_ID_BYTES else new_request_id()
        try:
            req = decode_request(request, request_id)
            rec = await self._pipeline.recommend(req, _deadline(context))
            return encode_response(rec)
        except Exception as exc:
            code, message = status_for(exc, quoted_id)
            context.set_trailing_metadata((("x-request-id", quoted_id),))
            await context.abort(code, message)
