"""Reading the files that settings name (certificates, keys), for the server and the clients alike."""

from __future__ import annotations

from pathlib import Path

from hyperrec.core.errors import ConfigError


def read_file(path: Path, what: str) -> bytes:
    """The bytes of a file a setting names (a certificate, a key); ConfigError naming the setting if unreadable."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
