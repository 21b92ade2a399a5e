"""The one exception the client package raises for a call the server (or the channel) refused.

Callers outside the client package print it or count it without knowing gRPC: it carries the status code's name
("INVALID_ARGUMENT", "UNAVAILABLE", ...) and the details text exactly as the channel reported them.
"""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """A call ended with a status other than OK; `code` is the status code's name, `details` its message."""

    def __init__(self, code: str, details: str | None) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def client_error(exc: grpc.RpcError) -> ClientError:
    """The ClientError for a failed call: the status code's name and the details, as the channel gave them."""
    return ClientError(exc.code().name, exc.details())
