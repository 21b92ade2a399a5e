"""Process logging: plain text for people, or JSON lines (python-json-logger) for log pipelines.

Every record carries `request_id`: the id of the gRPC call being served when it was logged (set by the
servicer in a context variable, so concurrent calls on one event loop each see their own), or null.

In JSON mode the process's standard error is a log too: gRPC's C core writes its own lines there (a failed TLS
handshake, for one), and so does Python for a crash. Those lines are read back from a pipe and logged as JSON
records of the logger `stderr`, at the severity a C-core line starts with (E, W, I), so a log pipeline never
meets a line that is not JSON.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
from contextvars import ContextVar
from typing import TextIO

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


NATIVE_LOGGER = "stderr"
# C-core (abseil) lines start with a severity letter and the date: "E1204 16:00:00.123456  4711 file.cc:12] ..."
_NATIVE_LINE = re.compile(r"^([EWIF])\d{4} ")
_SEVERITY = {"E": logging.ERROR, "W": logging.WARNING, "I": logging.INFO, "F": logging.CRITICAL}
_stderr_pump: tuple[TextIO, threading.Thread] | None = None


def _native_severity(line: str) -> int:
    match = _NATIVE_LINE.match(line)
    return _SEVERITY[match.group(1)] if match else logging.WARNING


def _is_json_record(text: str) -> bool:
    if not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _pump(read_fd: int, out: TextIO) -> None:
    """Log every line written to the redirected standard error until its last writer closes it. A line that is a
    JSON record already (a child process that logs JSON to the stderr it inherited) goes out as it is."""
    log = logging.getLogger(NATIVE_LOGGER)
    with os.fdopen(read_fd, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            text = line.rstrip("\n")
            if _is_json_record(text):
                os.write(out.fileno(), (text + "\n").encode())  # one write per line, as the handler's own
            elif text:
                log.log(_native_severity(text), text)


def capture_stderr() -> TextIO:
    """Send file descriptor 2 through a pipe whose lines are logged (see the module doc) and return a stream on
    the original standard error for the log handler itself. Idempotent; undone at exit after the last lines."""
    global _stderr_pump
    if _stderr_pump is None:
        original = os.dup(2)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        stream = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace")
        thread = threading.Thread(target=_pump, args=(read_fd, stream), name="hyperrec-stderr", daemon=True)
        thread.start()
        _stderr_pump = (stream, thread)
        atexit.register(_release_stderr)
    return _stderr_pump[0]


def _release_stderr() -> None:
    """At exit (after a crash's traceback went into the pipe): give fd 2 back, let the pump log what is left."""
    if _stderr_pump is None:
        return
    stream, thread = _stderr_pump
    sys.stderr.flush()
    os.dup2(stream.fileno(), 2)  # closes the pipe's last writer: the pump reads to its end and stops
    thread.join(timeout=2.0)


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
    handler = logging.StreamHandler(capture_stderr() if fmt == "json" else sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(RequestIdFilter())
    handler.hyperrec = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
