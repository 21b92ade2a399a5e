"""Bearer tokens with scopes.

Tokens arrive as call metadata `authorization: Bearer <token>`. Each configured token grants scopes:
`recommend` (the Recommender service), `ingest` (the Profiles service), `admin` (ModelAdmin). The admin
service always needs a token; Recommender and Profiles need one as soon as any configured token grants their
scope (so configuring client tokens is what turns enforcement on). Health and reflection never need one.

A presented token is compared, in constant time, against every configured token, so the time a check takes
says nothing about which token (if any) matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from hyperrec.core.errors import PermissionDenied, Unauthenticated
from hyperrec.core.tokens import Token

_PREFIX = "bearer "


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization` metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value.lower().startswith(_PREFIX):
            return value[len(_PREFIX) :].strip() or None
    return None


class TokenAuth:
    """Decides whether a call's metadata carries a token with the scope its service needs."""

    def __init__(self, tokens: Iterable[Token] = ()) -> None:
        self._tokens = tuple(tokens)
        self._enforced = frozenset({"admin"} | {s for t in self._tokens for s in t.scopes})

    def check(self, scope: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        """Return when the call may proceed; raise Unauthenticated or PermissionDenied otherwise."""
        if scope not in self._enforced:
            return
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing bearer token (metadata `authorization: Bearer <token>`)")
        if not self._tokens:
            raise Unauthenticated(f"this server has no token with the {scope} scope; such calls are refused")
        presented = token.encode()
        # Every configured token is compared (no early exit), in constant time each.
        matches = [hmac.compare_digest(presented, t.value.encode()) for t in self._tokens]
        granted = frozenset().union(*(t.scopes for t, hit in zip(self._tokens, matches, strict=True) if hit))
        if not any(matches):
            raise Unauthenticated("invalid bearer token")
        if scope not in granted:
            raise PermissionDenied(f"this token lacks the {scope} scope")
