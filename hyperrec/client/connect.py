"""How the clients (recommend, models, health, the load tester) reach a server: address, TLS and token.

One place builds channels, so every client speaks plaintext, TLS or mutual TLS the same way:
- TLS `enabled` alone trusts the system's root certificates; a `ca` file trusts that CA (and implies TLS);
- `cert` and `key` present a client certificate (mutual TLS);
- `server_name` checks the server certificate against that name instead of the target's host;
- a `token` is sent as `authorization: Bearer <token>` with every call.
The command line's flags for these (`--tls`, `--tls-ca`, ...) are parsed in `hyperrec.app.cli_args`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from hyperrec.client.errors import client_error
from hyperrec.core.errors import ConfigError
from hyperrec.core.files import read_file


def _read(path: Path | None, what: str) -> bytes | None:
    return None if path is None else read_file(path, what)


@dataclass(frozen=True)
class TlsClient:
    """Client-side TLS settings; all unset means plaintext."""

    enabled: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    @property
    def on(self) -> bool:
        return self.enabled or self.ca is not None or self.cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA"),
            private_key=_read(self.key, "TLS key"),
            certificate_chain=_read(self.cert, "TLS certificate"),
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass(frozen=True)
class Connection:
    target: str = "localhost:50051"
    tls: TlsClient = field(default_factory=TlsClient)
    token: str | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self) -> grpc.Channel:
        if not self.tls.on:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.tls.credentials(), options=self.tls.options())

    def aio_channel(self) -> grpc.aio.Channel:
        if not self.tls.on:
            return grpc.aio.insecure_channel(self.target)
        return grpc.aio.secure_channel(self.target, self.tls.credentials(), options=self.tls.options())

    def unary(self, stub_type: Callable[[grpc.Channel], Any], method: str, request: Any, timeout_s: float) -> Any:
        """One unary call, with the token, on a channel of its own: the reply, or ClientError when the server (or
        the channel) refuses it."""
        with self.channel() as channel:
            try:
                return getattr(stub_type(channel), method)(request, metadata=self.metadata(), timeout=timeout_s)
            except grpc.RpcError as exc:
                raise client_error(exc) from exc
