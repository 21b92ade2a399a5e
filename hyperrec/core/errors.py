"""Typed failures of the domain core.

Every failure the core raises on purpose is one of these; the gRPC layer maps
them to status codes in exactly one place (`hyperrec/server/status.py`). Anything else
that escapes is a bug and becomes INTERNAL carrying the request id.
"""

from __future__ import annotations


class HyperrecError(Exception):
    """Base class of all deliberate hyperrec failures."""


class InvalidArgument(HyperrecError):
    """A request field is malformed. `field` is its dotted path, e.g. `context.device_type`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFound(HyperrecError):
    """A named thing (model, version) does not exist."""


class Unauthenticated(HyperrecError):
    """The call carries no valid credentials."""


class PermissionDenied(HyperrecError):
    """The credentials are valid but do not allow this call."""


class FailedPrecondition(HyperrecError):
    """The request is valid but cannot apply to this user or model as they stand."""


class Aborted(HyperrecError):
    """A concurrent change won: the shared state this call was based on (the model policy's revision) changed
    before it could apply. Nothing was changed by this call; re-read the state and decide again."""


class Unavailable(HyperrecError):
    """The server cannot answer yet (no model loaded) or a hard dependency is down."""


class DeadlineExceeded(HyperrecError):
    """The caller's deadline passed before an answer was ready; no further work is done."""


class ProfileStoreError(HyperrecError):
    """The profile store failed or timed out. The pipeline answers DEGRADED instead."""


class ProfileStoreTimeout(ProfileStoreError):
    """The store's client gave up waiting on one of its own timers (a socket read, a free connection).

    Such timers run on the event loop: when the loop is late, they fire late, so the pipeline judges these like
    its own budget misses (hyperrec/core/budget.py) rather than as plain store failures.
    """


class BundleError(HyperrecError):
    """A model bundle is missing a file, is corrupt, or is inconsistent.

    `file` names the offending file inside the bundle directory (or the directory itself).
    """

    def __init__(self, file: str, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = file
        self.problem = problem


class ConfigError(HyperrecError):
    """The server configuration is invalid; raised at start-up, never inside a request."""
