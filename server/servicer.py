"""The Recommender gRPC servicer: parse, decode, call the pipeline, encode. Nothing else.

Requests arrive as raw bytes and are parsed here, inside the error mapping, so a
malformed message (for example a string that is not valid UTF-8) is answered
INVALID_ARGUMENT instead of the UNKNOWN that grpcio gives for a failing deserializer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hyperrec.domain import request_id_problem
from hyperrec.errors import InvalidArgument
from hyperrec.pipeline import Recommender
from hyperrec.v1 import recommender_pb2 as pb
from server.codec import decode_request, encode_response
from server.status import status_for

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name


def new_request_id() -> str:
    return uuid.uuid4().hex


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def parse_request(raw: bytes) -> pb.RecommendRequest:
    """The wire message; InvalidArgument when it is not a valid RecommendRequest."""
    try:
        return pb.RecommendRequest.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument("request", f"not a valid RecommendRequest ({exc})") from None


class RecommenderServicer:
    def __init__(self, pipeline: Recommender) -> None:
        self._pipeline = pipeline

    async def Recommend(  # noqa: N802 - name fixed by the contract
        self, raw: bytes, context: grpc.aio.ServicerContext[bytes, pb.RecommendResponse]
    ) -> pb.RecommendResponse:
        quoted_id = new_request_id()
        try:
            request = parse_request(raw)
            request_id = request.request_id or quoted_id
            if request_id_problem(request_id) is None:  # else validation rejects it and we quote ours
                quoted_id = request_id
            req = decode_request(request, request_id)
            rec = await self._pipeline.recommend(req, _deadline(context))
            return encode_response(rec)
        except Exception as exc:
            code, message = status_for(exc, quoted_id)
            context.set_trailing_metadata((("x-request-id", quoted_id),))
            await context.abort(code, message)


def add_to_server(servicer: RecommenderServicer, server: grpc.aio.Server) -> None:
    """Register Recommend with a raw-bytes request deserializer (see the module docstring)."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Recommend": grpc.unary_unary_rpc_method_handler(
                servicer.Recommend,
                request_deserializer=None,
                response_serializer=pb.RecommendResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
