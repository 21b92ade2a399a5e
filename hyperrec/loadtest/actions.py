"""Things that happen mid-run, at set times, and are marked on the timeline: a model swap or rollback through the
admin API, or any command (stopping and restarting a Redis the run owns, for example).

An action is written `SECONDS:KIND:ARGS` (SECONDS after the warm-up ends):

    20:activate:demo:4            ActivateVersion(model "demo", version 4) with the admin token
    40:rollback:demo              Rollback(model "demo")
    30:command:redis-cli -p 6390 shutdown nosave
    45:command:redis-server --port 6390 --daemonize yes

Each becomes an event {"t": seconds after the warm-up when it ran, "label": ..., "ok": bool, "detail": ...}.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from hyperrec.client.admin import activate_version, rollback
from hyperrec.client.connect import Connection
from hyperrec.client.errors import ClientError

KINDS = ("activate", "rollback", "command")


@dataclass(frozen=True)
class Action:
    at_s: float
    kind: str
    args: tuple[str, ...]

    @property
    def label(self) -> str:
        if self.kind == "activate":
            return f"activate {self.args[0]} v{self.args[1]}"
        if self.kind == "rollback":
            return f"rollback {self.args[0]}"
        return f"command: {' '.join(self.args)}"


def parse_action(text: str) -> Action:
    """`SECONDS:KIND:ARGS`; ValueError naming the problem."""
    parts = text.split(":", 2)
    if len(parts) < 3 or parts[1] not in KINDS:
        raise ValueError(f"action {text!r}: expected SECONDS:KIND:ARGS with KIND one of {', '.join(KINDS)}")
    at, kind, rest = float(parts[0]), parts[1], parts[2]
    if at < 0:
        raise ValueError(f"action {text!r}: the time must not be negative")
    if kind == "activate":
        model, sep, version = rest.partition(":")
        if not sep or not version.isdigit():
            raise ValueError(f"action {text!r}: expected SECONDS:activate:MODEL:VERSION")
        return Action(at, kind, (model, version))
    if kind == "rollback":
        return Action(at, kind, (rest,))
    argv = tuple(shlex.split(rest))
    if not argv:
        raise ValueError(f"action {text!r}: empty command")
    return Action(at, kind, argv)


def perform(action: Action, connection: Connection) -> tuple[bool, str]:
    """Run one action now; (succeeded, detail)."""
    if action.kind == "command":
        done = subprocess.run(action.args, capture_output=True, text=True, timeout=60, check=False)
        return done.returncode == 0, (done.stdout + done.stderr).strip()[-200:]
    try:
        if action.kind == "activate":
            model = activate_version(connection, action.args[0], int(action.args[1]), timeout_s=300)
        else:
            model = rollback(connection, action.args[0], timeout_s=300)
    except ClientError as exc:
        return False, f"{exc.code}: {exc.details}"
    return True, f"active version {model.active_version}"


class ActionRunner:
    """Runs actions on a thread at their times, counted from `measure_start` (a time.perf_counter() value)."""

    def __init__(self, actions: tuple[Action, ...], connection: Connection) -> None:
        self._actions = sorted(actions, key=lambda a: a.at_s)
        self._connection = connection
        self.events: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None

    def start(self, measure_start: float) -> None:
        if self._actions:
            self._thread = threading.Thread(target=self._run, args=(measure_start,), daemon=True)
            self._thread.start()

    def _run(self, measure_start: float) -> None:
        for action in self._actions:
            time.sleep(max(0.0, measure_start + action.at_s - time.perf_counter()))
            started = time.perf_counter() - measure_start
            ok, detail = perform(action, self._connection)
            self.events.append({"t": round(started, 3), "label": action.label, "ok": ok, "detail": detail})

    def join(self) -> list[dict[str, Any]]:
        if self._thread is not None:
            self._thread.join()
        return self.events
