"""`policy.json`: which version of a model every replica serves, kept in the shared model repository.

The file is the one place a pin, a rollback, a pin release or a canary lives, so every replica reading the same
repository converges on it within one watch interval and a restart keeps it. Admin calls change it with a
compare-and-swap on its `revision`: the writer read the file (its revision and bytes) before it started, and
under an exclusive lock beside the file re-reads it; when it changed meanwhile the change is refused with
`Aborted` (never retried: the caller's intent was based on a state that no longer holds). Otherwise the new
content, with revision + 1, goes to a temporary file in the same folder, is fsynced, and replaces the old one
with `os.replace`, so a reader sees the old file or the new one, never a torn one.

The lock is `fcntl.flock` on `.policy.json.lock` beside the file. That excludes writers on one machine and, on
Linux NFS v4 clients (which emulate flock with NFS byte-range locks), across machines; NFS v3 needs a working
lock manager (lockd), and some FUSE or object-store mounts ignore locks entirely: there two writers could race.
See docs/model-repo.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hyperrec.core.errors import Aborted

log = logging.getLogger(__name__)

POLICY = "policy.json"
LOCK = ".policy.json.lock"
NO_SOURCE = "none"


@dataclass(frozen=True)
class Policy:
    """What `policy.json` asks for: a stable version (None: the newest usable), a canary and its share."""

    stable: int | None = None
    canary: int | None = None
    canary_percent: float = 0.0


@dataclass(frozen=True)
class PolicyRecord:
    """One read of `policy.json`: what it asks for, its revision (0: no file, a broken one, or a hand-written
    one without a revision), where it is ("none" when absent), who wrote it last, and a digest of its bytes for
    the compare-and-swap (a hand edit that keeps the revision still counts as a change)."""

    policy: Policy = field(default_factory=Policy)
    revision: int = 0
    source: str = NO_SOURCE
    updated_by: str = ""
    updated_at: str = ""
    digest: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # the file's JSON object, kept on rewrite


def _version_field(value: object, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _revision_field(value: object) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"revision must be a non-negative integer, got {value!r}")
    return value


def parse_policy(data: object) -> Policy:
    """The policy in a decoded `policy.json`; ValueError (or TypeError, AttributeError) when malformed."""
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    labels = data.get("labels", {})
    stable = _version_field(data.get("version"), "version") or _version_field(labels.get("stable"), "stable")
    canary = _version_field(labels.get("canary"), "canary")
    percent = float(data.get("canary_percent", 0.0))
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"canary_percent must be within 0-100, got {percent}")
    return Policy(stable, canary, percent if canary is not None else 0.0)


def load_policy(model_dir: Path) -> PolicyRecord:
    """Read `policy.json` (blocking file I/O: call it off the event loop). Absent: the default policy with
    source "none". Broken (logged): the default policy, revision 0, but its path and digest, so an admin write
    based on this read replaces it."""
    path = model_dir / POLICY
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return PolicyRecord()
    except OSError as exc:
        log.error("ignoring %s: %s", path, exc)
        return PolicyRecord(source=str(path))
    digest = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(raw)
        policy = parse_policy(data)
        revision = _revision_field(data.get("revision"))
    except (ValueError, TypeError, AttributeError) as exc:
        log.error("ignoring %s: %s", path, exc)
        return PolicyRecord(source=str(path), digest=digest)
    return PolicyRecord(
        policy,
        revision,
        str(path),
        str(data.get("updated_by", "")),
        str(data.get("updated_at", "")),
        digest,
        dict(data),
    )


def read_policy(model_dir: Path) -> Policy:
    """`policy.json`: {"version": N} pins N; {"labels": {"stable": N, "canary": M}, "canary_percent": P} serves N
    and routes P % of users to M. Absent or broken (logged): the newest usable version, no canary."""
    return load_policy(model_dir).policy


@contextmanager
def _exclusive(model_dir: Path) -> Iterator[None]:
    """Hold the policy's lock file exclusively (blocking until the other writer is done)."""
    fd = os.open(model_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


Change = Callable[[dict[str, Any]], dict[str, Any]]


def write_policy(model_dir: Path, base: PolicyRecord, change: Change, updated_by: str, source: str) -> PolicyRecord:
    """Apply `change` to the file's fields and write them with revision + 1, only if the file is still `base`
    (same revision and bytes); else raise Aborted and leave the file alone. Blocking: call it off the event loop.
    A broken file counts as revision 0 with no fields, so a write based on reading it replaces it."""
    path = model_dir / POLICY
    with _exclusive(model_dir):
        current = load_policy(model_dir)
        if (current.revision, current.digest) != (base.revision, base.digest):
            raise Aborted(
                f"{path} changed to revision {current.revision} (by {current.updated_by or 'hand'}) while this "
                f"change was based on revision {base.revision}; list the models and try again"
            )
        fields = change(dict(current.fields))
        fields.update(
            revision=current.revision + 1,
            updated_by=updated_by,
            updated_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            source=source,
        )
        parse_policy(fields)  # never write what the readers would reject
        _replace_atomically(path, json.dumps(fields, indent=2, sort_keys=True) + "\n")
    written = load_policy(model_dir)
    log.info("%s: revision %d by %s (%s)", path, written.revision, updated_by, source)
    return written


def pin_change(version: int) -> Change:
    """The change that pins `version` ("version": N; a label "stable" would only repeat it, so it goes)."""

    def change(fields: dict[str, Any]) -> dict[str, Any]:
        fields["version"] = version
        _drop_stable_label(fields)
        return fields

    return change


def release_change(fields: dict[str, Any]) -> dict[str, Any]:
    """The change that releases any pin ("version" and the "stable" label), keeping a canary."""
    fields.pop("version", None)
    _drop_stable_label(fields)
    return fields


def canary_change(version: int | None, percent: float) -> Change:
    """The change that routes `percent` % of users to `version`, or (None) stops the canary."""

    def change(fields: dict[str, Any]) -> dict[str, Any]:
        labels = fields.get("labels")
        labels = dict(labels) if isinstance(labels, dict) else {}
        if version is None:
            labels.pop("canary", None)
            fields.pop("canary_percent", None)
        else:
            labels["canary"] = version
            fields["canary_percent"] = percent
        if labels:
            fields["labels"] = labels
        else:
            fields.pop("labels", None)
        return fields

    return change


def _drop_stable_label(fields: dict[str, Any]) -> None:
    labels = fields.get("labels")
    if isinstance(labels, dict):
        labels = {k: v for k, v in labels.items() if k != "stable"}
        if labels:
            fields["labels"] = labels
        else:
            fields.pop("labels", None)
