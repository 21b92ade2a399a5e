"""Process logging: plain text for people, or JSON lines (python-json-logger) for log pipelines.

Every record carries `request_id`: the id of the gRPC call being served when it was logged (set by the
servicer in a context variable, so concurrent calls on one event loop each see their own), or null.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str | None] = ContextVar("hyperrec_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = ("levelname", "name", "message", "request_id")


class RequestIdFilter(logging.Filter):
    """Adds the current call's request id to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        # `time` is an ISO 8601 UTC timestamp.
        return JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"}, timestamp="time")
    return logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at `level` in format `text` or `json`.

    Like logging.basicConfig, it leaves a process whose logging is already set up by someone else (an embedding
    application, pytest) alone; a second call replaces only the handler the first one installed.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "hyperrec", False)]
    if len(ours) != len(root.handlers):
        return
    for old in ours:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(RequestIdFilter())
    handler.hyperrec = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
