"""The command line's connection flags (target, TLS, token), shared by recommend, health, models and loadtest.

They parse into a `hyperrec.client.connect.Connection`; the flags' meaning is documented there and in the README.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hyperrec.client.connect import Connection, TlsClient


def add_connection_arguments(
    parser: argparse.ArgumentParser, token_env: str = "HYPERREC_TOKEN", target_help: str | None = None
) -> None:
    """Add --target, the --tls* flags and --token; the token defaults to the environment variable `token_env`."""
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
    """The Connection the parsed flags describe; an empty token (flag or environment) means none."""
    tls = TlsClient(args.tls, args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    token = args.token or os.environ.get(args.token_env) or None
    return Connection(args.target, tls, token)
