"""The one mapping from domain failures to gRPC status codes.

Every deliberate failure is a `HyperrecError` subclass with its own code;
anything else is a bug: it is logged with its stack trace and answered
INTERNAL with the request id, never UNKNOWN.
"""

from __future__ import annotations

import logging

import grpc

from hyperrec.core.errors import (
    Aborted,
    BundleError,
    DeadlineExceeded,
    FailedPrecondition,
    HyperrecError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProfileStoreError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[HyperrecError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (BundleError, grpc.StatusCode.FAILED_PRECONDITION),  # a model version that cannot load: the reason is the answer
    (Aborted, grpc.StatusCode.ABORTED),  # lost a compare-and-swap on shared state (policy.json): re-read, retry
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ProfileStoreError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
)


def status_for(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception raised while serving `request_id`."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, f"{exc} (request id {request_id})"
    log.error("internal error serving request %s", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id}"
