"""The gRPC servicers: parse, decode, call the protocol-neutral core, encode. Nothing else.

Requests arrive as raw bytes and are parsed here, inside the error mapping, so a
malformed message (for example a string that is not valid UTF-8) is answered
INVALID_ARGUMENT instead of the UNKNOWN that grpcio gives for a failing deserializer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from hyperrec.core.admission import check_request_id, deadline_after, new_request_id, settle_request_id
from hyperrec.core.errors import DeadlineExceeded, InvalidArgument
from hyperrec.core.ingest import ProfileService
from hyperrec.core.logs import REQUEST_ID
from hyperrec.core.pipeline import RecommendPipeline
from hyperrec.server.codec import decode_event, decode_request, encode_ingest_result, encode_response
from hyperrec.server.status import status_for
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import recommender_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
PROFILES_SERVICE_NAME = ppb.DESCRIPTOR.services_by_name["Profiles"].full_name

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]


def parse(kind: type[Req], raw: bytes) -> Req:
    """The wire message; InvalidArgument when it is not a valid `kind`."""
    try:
        return kind.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument("request", f"not a valid {kind.DESCRIPTOR.name} ({exc})") from None


def _expired(context: Context) -> bool:
    """Whether the call's deadline has passed (grpc then ends it with DEADLINE_EXCEEDED itself)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


async def answer(
    kind: type[Req], raw: bytes, context: Context, run: Callable[[Req, str, float | None], Awaitable[Resp]]
) -> Resp:
    """Parse `raw`, settle the request id to quote, run the call, and map any failure to its status."""
    quoted_id = new_request_id()
    try:
        request = parse(kind, raw)
        request_id, quoted_id = settle_request_id(getattr(request, "request_id", ""), quoted_id)
        REQUEST_ID.set(quoted_id)  # this call's task only: log records made while serving it carry the id
        reply = await run(request, request_id, deadline_after(context.time_remaining()))
    except Exception as exc:
        if isinstance(exc, DeadlineExceeded) and (_expired(context) or context.done() or context.cancelled()):
            # gRPC ends (or already ended) the call with DEADLINE_EXCEEDED itself; aborting it too races that end
            # and fails inside grpcio, which logs an ExecuteBatchError traceback per dropped call.
            raise asyncio.CancelledError from None
        code, message = status_for(exc, quoted_id)
        context.set_trailing_metadata((("x-request-id", quoted_id),))
        try:
            await context.abort(code, message)
        except grpc.aio.AbortError:
            raise  # the normal end of an abort
        except Exception:
            # The call ended between the check above and the abort (its deadline passed just then): grpcio can no
            # longer send a status; say nothing more instead of surfacing its ExecuteBatchError.
            if context.done() or _expired(context):
                raise asyncio.CancelledError from None
            raise
    if _expired(context):  # too late to answer: grpc has ended the call with DEADLINE_EXCEEDED (as above)
        raise asyncio.CancelledError
    return reply


class RecommenderServicer:
    def __init__(self, pipeline: RecommendPipeline) -> None:
        self._pipeline = pipeline

    async def Recommend(self, raw: bytes, context: Context) -> pb.RecommendResponse:  # noqa: N802 - contract name
        async def run(request: pb.RecommendRequest, request_id: str, deadline: float | None) -> pb.RecommendResponse:
            return encode_response(await self._pipeline.recommend(decode_request(request, request_id), deadline))

        return await answer(pb.RecommendRequest, raw, context, run)


def _decoded_events(request: ppb.RecordEventsRequest) -> list[Any]:
    """Each event decoded, or the InvalidArgument it raised (a per-event rejection, not a failed call)."""
    out: list[Any] = []
    for event in request.events:
        try:
            out.append(decode_event(event))
        except InvalidArgument as exc:
            out.append(exc)
    return out


class ProfilesServicer:
    def __init__(self, service: ProfileService) -> None:
        self._service = service

    async def RecordEvents(self, raw: bytes, context: Context) -> ppb.RecordEventsResponse:  # noqa: N802
        async def run(request: ppb.RecordEventsRequest, request_id: str, _: float | None) -> ppb.RecordEventsResponse:
            check_request_id(request_id)  # before any event is recorded
            result = await self._service.record_events(_decoded_events(request))
            return encode_ingest_result(result, request_id)

        return await answer(ppb.RecordEventsRequest, raw, context, run)

    async def SetConsent(self, raw: bytes, context: Context) -> ppb.SetConsentResponse:  # noqa: N802
        async def run(request: ppb.SetConsentRequest, _: str, __: float | None) -> ppb.SetConsentResponse:
            deleted = await self._service.set_consent(request.user_id, request.personalization)
            return ppb.SetConsentResponse(profile_deleted=deleted)

        return await answer(ppb.SetConsentRequest, raw, context, run)

    async def ForgetUser(self, raw: bytes, context: Context) -> ppb.ForgetUserResponse:  # noqa: N802
        async def run(request: ppb.ForgetUserRequest, _: str, __: float | None) -> ppb.ForgetUserResponse:
            return ppb.ForgetUserResponse(deleted=list(await self._service.forget(request.user_id)))

        return await answer(ppb.ForgetUserRequest, raw, context, run)

    async def SetInterests(self, raw: bytes, context: Context) -> ppb.SetInterestsResponse:  # noqa: N802
        async def run(request: ppb.SetInterestsRequest, _: str, __: float | None) -> ppb.SetInterestsResponse:
            stored = await self._service.set_interests(request.user_id, list(request.categories))
            return ppb.SetInterestsResponse(categories=list(stored))

        return await answer(ppb.SetInterestsRequest, raw, context, run)


def unary_handlers(service: str, methods: Mapping[str, tuple[Callable[..., Any], Callable[..., bytes]]]) -> Any:
    """Unary handlers taking raw request bytes (see the module docstring)."""
    return grpc.method_handlers_generic_handler(
        service,
        {
            name: grpc.unary_unary_rpc_method_handler(call, request_deserializer=None, response_serializer=serialize)
            for name, (call, serialize) in methods.items()
        },
    )


def add_to_server(servicer: RecommenderServicer, server: grpc.aio.Server) -> None:
    methods = {"Recommend": (servicer.Recommend, pb.RecommendResponse.SerializeToString)}
    server.add_generic_rpc_handlers((unary_handlers(SERVICE_NAME, methods),))


def add_profiles_to_server(servicer: ProfilesServicer, server: grpc.aio.Server) -> None:
    methods = {
        "RecordEvents": (servicer.RecordEvents, ppb.RecordEventsResponse.SerializeToString),
        "SetConsent": (servicer.SetConsent, ppb.SetConsentResponse.SerializeToString),
        "ForgetUser": (servicer.ForgetUser, ppb.ForgetUserResponse.SerializeToString),
        "SetInterests": (servicer.SetInterests, ppb.SetInterestsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((unary_handlers(PROFILES_SERVICE_NAME, methods),))
