"""The one interceptor every call passes: authentication by scope, admission control, drain and per-method metrics.

- Auth: the service a method belongs to decides the scope it needs (`SERVICE_SCOPES`); the token is checked
  before the request message is even read. Health and reflection are not listed, so they pass untouched.
- Admission at the door: Recommender and Profiles calls are counted against the adaptive concurrency limit of
  `hyperrec/core/admission.py` (`AdaptiveLimit`) the moment grpcio hands them to Python, before their request
  message is read; one beyond the limit is refused at once with RESOURCE_EXHAUSTED (its message is never
  decoded). When its handler starts, an admitted call whose deadline cannot be met behind the calls queued ahead
  of it is refused RESOURCE_EXHAUSTED too (grpcio shows a call's deadline only to its handler). The gate only
  reports each call's start, end and latency to the limit and refuses what it refuses. We count calls ourselves
  rather than use grpcio's `maximum_concurrent_rpcs`: that limit is fixed, counts health checks and admin calls
  too, and has had bugs (grpc/grpc issue 30424: the aio server queued calls beyond it instead of refusing them;
  issue 41531: its counter went negative after refusals and stopped limiting). Both are fixed in the grpcio we
  require (>= 1.85: tried with waves of concurrent calls, the excess was refused RESOURCE_EXHAUSTED every wave),
  but the first two reasons stand.
- Drain: after `close()` every call arriving (health and reflection included, as on a stopped server) is refused
  UNAVAILABLE at once, while the calls let in before go on; `wait_idle()` waits for them (the transport's `stop`
  gives them `grace_s`).
- Metrics: calls by method and status code, their duration from arrival (every wait in the process included),
  the queue time (arrival to handler start), the in-flight gauge and the current limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc

from hyperrec.core import metrics, tracing
from hyperrec.core.admission import AdaptiveLimit, new_request_id
from hyperrec.core.errors import HyperrecError
from hyperrec.server.auth import TokenAuth
from hyperrec.server.status import status_for

Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
CLOSED_MESSAGE = "server is shutting down: retry on another replica"
HANDLER_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _code_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status a failed call ended with (UNKNOWN when the handler raised without setting one)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # the cython context may hold the raw status number
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN"


class Ticket:
    """One call let through the gate, counted in until `end()` (idempotent). The handler ends it before the
    answer goes out; the call's task ends it too, for a call whose handler never ran (cancelled before)."""

    __slots__ = ("_gate", "ended", "limited")

    def __init__(self, gate: CallGate, limited: bool) -> None:
        self._gate = gate
        self.limited = limited  # counted against the concurrency limit (admin calls are not)
        self.ended = False

    def end(self, _: object = None) -> None:
        """Count the call out (once, however often called)."""
        if not self.ended:
            self.ended = True
            self._gate._leave(self.limited)


class CallGate(grpc.aio.ServerInterceptor):
    def __init__(self, auth: TokenAuth, limit: AdaptiveLimit, service_scopes: Mapping[str, str]) -> None:
        self._auth = auth
        self._limit = limit
        self._scopes = dict(service_scopes)
        self._closed = False
        self._active = 0  # calls let through (limited or not) that have not ended: the drain waits for them
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.CONCURRENCY_LIMIT.set(limit.current)

    @property
    def limit(self) -> AdaptiveLimit:
        return self._limit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        # The call's arrival, as closely as grpcio lets us see it: the first moment Python code runs for it.
        arrived = time.perf_counter()
        handler = await continuation(details)  # a grpc RpcMethodHandler (a named tuple), or None
        method: str = details.method
        if self._closed and handler is not None:  # every call, health and reflection too, as a stopped server does
            return self._refusal(handler, method, grpc.StatusCode.UNAVAILABLE, CLOSED_MESSAGE)
        scope = self._scopes.get(method.lstrip("/").split("/", 1)[0])
        if scope is None or handler is None:
            return handler
        try:
            self._auth.check(scope, details.invocation_metadata)
        except HyperrecError as exc:
            request_id = new_request_id()
            code, message = status_for(exc, request_id)
            return self._refusal(handler, method, code, message, request_id)
        if handler.unary_unary is None:  # every guarded method is unary today; a streaming one passes auth only
            return handler
        limited = scope != "admin"
        if limited and not self._limit.admit():
            return self._refusal(handler, method, grpc.StatusCode.RESOURCE_EXHAUSTED, self._limit.refusal())
        ticket = self._enter(limited)
        return handler._replace(unary_unary=self._admitted(handler.unary_unary, method, arrived, ticket))

    def close(self) -> None:
        """Refuse every call arriving from now on with UNAVAILABLE; the calls let in before go on."""
        self._closed = True

    async def wait_idle(self, within_s: float) -> bool:
        """Wait until every call let in has ended, at most `within_s` seconds; True when they all have."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    def _enter(self, limited: bool) -> Ticket:
        """Count a call in (the limit has admitted it when `limited`) until its ticket ends."""
        ticket = Ticket(self, limited)
        self._active += 1
        self._idle.clear()
        if limited:
            metrics.IN_FLIGHT.inc()
        task = asyncio.current_task()  # grpcio runs each call, interceptors included, in a task of its own
        if task is not None:
            task.add_done_callback(ticket.end)
        return ticket

    def _leave(self, limited: bool) -> None:
        """Count a call out (its ticket ended)."""
        self._active -= 1
        if limited:
            self._limit.release()
            metrics.IN_FLIGHT.dec()
        if self._active == 0:
            self._idle.set()

    def _refusal(
        self, handler: Any, method: str, code: grpc.StatusCode, message: str, request_id: str | None = None
    ) -> Any:
        """`handler` with its behaviour replaced by a refusal with `code` and `message`; the request message is
        left undecoded (the refusal never reads it)."""

        async def refuse(_: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metrics.REQUESTS.labels(method, code.name).inc()
            if request_id is not None:
                context.set_trailing_metadata((("x-request-id", request_id),))
            await context.abort(code, message)

        # Replace whichever behaviour the method has (an aborting coroutine serves every kind of call).
        kind = next(k for k in HANDLER_KINDS if getattr(handler, k))
        return handler._replace(**{kind: refuse, "request_deserializer": None})

    def _admitted(self, inner: Handler, method: str, arrived: float, ticket: Ticket) -> Handler:
        duration = metrics.REQUEST_DURATION.labels(method)

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            metrics.QUEUE_DURATION.labels(method).observe(started - arrived)
            if ticket.limited:
                why = self._limit.deadline_refusal(context.time_remaining())
                if why is not None:
                    ticket.end()
                    metrics.REQUESTS.labels(method, "RESOURCE_EXHAUSTED").inc()
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
            ok = False
            try:
                with tracing.span(method, server=True):
                    reply = await inner(request, context)
                ok = True
                return reply
            except asyncio.CancelledError:  # the client went away or its deadline passed
                remaining = context.time_remaining()
                expired = remaining is not None and remaining <= 0
                metrics.REQUESTS.labels(method, "DEADLINE_EXCEEDED" if expired else "CANCELLED").inc()
                raise
            except BaseException:
                metrics.REQUESTS.labels(method, _code_name(context)).inc()
                raise
            finally:
                ended = time.perf_counter()
                ticket.end()
                duration.observe(ended - arrived)
                if ok:
                    metrics.REQUESTS.labels(method, "OK").inc()
                    if ticket.limited:
                        self._observe(ended - arrived, ended - started, ended)

        return call

    def _observe(self, latency_s: float, service_s: float, now: float) -> None:
        """Report a completed call's latency to the limit and export where the limit now stands."""
        self._limit.observe(latency_s, service_s, now)
        metrics.CONCURRENCY_LIMIT.set(self._limit.current)
        baseline = self._limit.baseline
        if baseline is not None:
            metrics.LATENCY_BASELINE.set(baseline)
