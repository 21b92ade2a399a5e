"""Bearer-token checks for the gRPC services (the admin service today).

Tokens arrive as call metadata `authorization: Bearer <token>` and are compared in
constant time. The admin token may call ModelAdmin; client tokens are recognised
but refused there (PERMISSION_DENIED); anything else is UNAUTHENTICATED.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence

from hyperrec.errors import PermissionDenied, Unauthenticated

_PREFIX = "bearer "


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the call's `authorization` metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value.lower().startswith(_PREFIX):
            return value[len(_PREFIX) :].strip() or None
    return None


def _matches(token: str, candidate: str) -> bool:
    return hmac.compare_digest(token.encode(), candidate.encode())


class TokenAuth:
    def __init__(self, admin_token: str | None, client_tokens: Sequence[str] = ()) -> None:
        self._admin = admin_token
        self._clients = tuple(t for t in client_tokens if t)

    @staticmethod
    def parse_clients(raw: str | None) -> tuple[str, ...]:
        return tuple(t.strip() for t in (raw or "").split(",") if t.strip())

    def require_admin(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> None:
        token = bearer_token(metadata)
        if token is None:
            raise Unauthenticated("missing bearer token (metadata `authorization: Bearer <token>`)")
        if self._admin is None:
            raise Unauthenticated("this server has no admin token configured; admin calls are refused")
        # Compare against every known token so the time taken says nothing about which one matched.
        is_admin = _matches(token, self._admin)
        is_client = any([_matches(token, client) for client in self._clients])
        if is_admin:
            return
        if is_client:
            raise PermissionDenied("this token may not call the admin service")
        raise Unauthenticated("invalid bearer token")
