"""Bearer tokens with scopes, as configured (`auth_tokens`, `admin_token`): parsed and checked at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from hyperrec.core.errors import ConfigError

SCOPES = ("recommend", "ingest", "admin")
MIN_TOKEN_BYTES = 16


@dataclass(frozen=True)
class Token:
    value: str
    scopes: frozenset[str]


def parse_tokens(raw: str | None) -> tuple[Token, ...]:
    """Tokens from `<scope>[+<scope>...]:<token>` entries separated by whitespace (config `auth_tokens`)."""
    tokens = []
    for entry in (raw or "").split():
        scopes_part, sep, value = entry.partition(":")
        if not sep or not value:
            # never echo the entry: it may be a bare secret token
            raise ConfigError("auth_tokens: every entry must read <scope>[+<scope>]:<token>")
        scopes = frozenset(s for s in scopes_part.split("+") if s)
        unknown = scopes - set(SCOPES)
        if not scopes or unknown:
            raise ConfigError(f"auth_tokens: an entry has no scope or an unknown one; scopes are {', '.join(SCOPES)}")
        if len(value.encode()) < MIN_TOKEN_BYTES:
            raise ConfigError(f"auth_tokens: tokens must be at least {MIN_TOKEN_BYTES} bytes")
        tokens.append(Token(value, scopes))
    return tuple(tokens)
