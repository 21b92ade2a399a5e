"""Names that become paths: model names in the repository."""

from __future__ import annotations

import re

# Letters, digits, '.', '_' and '-', not starting with '.': safe as a directory name everywhere, never a path.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_name(name: str, what: str = "model name") -> str:
    """Return the name, or raise ValueError unless it is 1-128 of [A-Za-z0-9._-], not starting with '.'."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid {what} {name!r}: use 1-128 of A-Z a-z 0-9 . _ - and do not start with '.'")
    return name
