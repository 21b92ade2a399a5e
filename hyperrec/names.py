"""Names that become paths: model names in the repository."""

from __future__ import annotations


def check_name(name: str, what: str = "model name") -> str:
    """Reject names that could escape the repository (path separators, '..', hidden) and return the name."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise ValueError(f"invalid {what} {name!r}")
    return name
