"""How the command-line clients (recommend, models, health, loadtest) reach a server: address, TLS and token.

One place builds channels, so every client speaks plaintext, TLS or mutual TLS the same way:
- `--tls` alone trusts the system's root certificates; `--tls-ca FILE` trusts that CA (and implies TLS);
- `--tls-cert FILE --tls-key FILE` present a client certificate (mutual TLS);
- `--tls-server-name NAME` checks the server certificate against NAME instead of the target's host;
- `--token` (or an environment variable) is sent as `authorization: Bearer <token>` with every call.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

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


def add_connection_arguments(
    parser: argparse.ArgumentParser, token_env: str = "HYPERREC_TOKEN", target_help: str | None = None
) -> None:
    default = None if target_help else "localhost:50051"
    parser.add_argument("--target", default=default, help=target_help or "server address host:port")
    parser.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's root certificates")
    parser.add_argument("--tls-ca", type=Path, help="speak TLS, trusting this PEM CA bundle")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name the server certificate must carry (default: target host)")
    parser.add_argument("--token", help=f"bearer token sent with every call (default: ${token_env})")
    parser.set_defaults(token_env=token_env)


def connection_from_args(args: argparse.Namespace) -> Connection:
    tls = TlsClient(args.tls, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    token = args.token or os.environ.get(args.token_env) or None
    return Connection(args.target, tls, token)
