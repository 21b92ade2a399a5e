"""The one interceptor every call passes: authentication by scope, admission control and per-method metrics.

- Auth: the service a method belongs to decides the scope it needs (`SERVICE_SCOPES`); the token is checked
  before the request message is even read. Health and reflection are not listed, so they pass untouched.
- Admission: at most `max_in_flight` Recommender and Profiles calls run at once (the protocol-neutral rule is
  `hyperrec/core/admission.py`). One more is refused at once with RESOURCE_EXHAUSTED rather than queued, so the
  calls already admitted keep their latency and the client can retry elsewhere. We count in-flight calls
  ourselves instead of relying on grpcio's `maximum_concurrent_rpcs`, which has had bugs (grpc/grpc issues 30424
  and 41531); tests/test_hardening.py checks the behaviour over a real channel.
- Metrics: calls by method and status code, their duration, and the in-flight gauge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from hyperrec.core import metrics, tracing
from hyperrec.core.admission import InFlightLimit, new_request_id
from hyperrec.core.errors import HyperrecError
from hyperrec.server.auth import TokenAuth
from hyperrec.server.status import status_for

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


def _code_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status a failed call ended with (UNKNOWN when the handler raised without setting one)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # the cython context may hold the raw status number
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN"


class CallGate(grpc.aio.ServerInterceptor):
    def __init__(self, auth: TokenAuth, max_in_flight: int, service_scopes: Mapping[str, str]) -> None:
        self._auth = auth
        self._limit = InFlightLimit(max_in_flight)
        self._scopes = dict(service_scopes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)  # a grpc RpcMethodHandler (a named tuple), or None
        method: str = details.method
        scope = self._scopes.get(method.lstrip("/").split("/", 1)[0])
        if scope is None or handler is None:
            return handler
        try:
            self._auth.check(scope, details.invocation_metadata)
        except HyperrecError as exc:
            return self._refusal(handler, method, exc)
        if handler.unary_unary is None:  # every guarded method is unary today; a streaming one passes auth only
            return handler
        return handler._replace(unary_unary=self._admitted(handler.unary_unary, method, limited=scope != "admin"))

    def _refusal(self, handler: Any, method: str, exc: HyperrecError) -> Any:
        async def refuse(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id = new_request_id()
            code, message = status_for(exc, request_id)
            metrics.REQUESTS.labels(method, code.name).inc()
            context.set_trailing_metadata((("x-request-id", request_id),))
            await context.abort(code, message)

        # Replace whichever behaviour the method has (an aborting coroutine serves every kind of call).
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        return handler._replace(**{kind: refuse})

    def _admitted(self, inner: Handler, method: str, limited: bool) -> Handler:
        duration = metrics.REQUEST_DURATION.labels(method)

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if limited and not self._limit.admit():
                metrics.REQUESTS.labels(method, "RESOURCE_EXHAUSTED").inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._limit.refusal())
            start = time.perf_counter()
            failed = False
            if limited:
                metrics.IN_FLIGHT.inc()
            try:
                with tracing.span(method, server=True):
                    return await inner(request, context)
            except asyncio.CancelledError:  # the client went away or its deadline passed
                failed = True
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                metrics.REQUESTS.labels(method, "DEADLINE_EXCEEDED" if expired else "CANCELLED").inc()
                raise
            except BaseException:
                failed = True
                metrics.REQUESTS.labels(method, _code_name(context)).inc()
                raise
            finally:
                if limited:
                    self._limit.release()
                    metrics.IN_FLIGHT.dec()
                duration.observe(time.perf_counter() - start)
                if not failed:
                    metrics.REQUESTS.labels(method, "OK").inc()

        return call
