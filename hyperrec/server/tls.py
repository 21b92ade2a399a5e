"""Server TLS credentials from PEM files, checked before anything listens.

grpcio accepts any bytes in `ssl_server_credentials` and fails only when the port is added, with an error that
blames the address; so the files are read and given a first look here, and `transport.bind` names them as a
likely cause when the port cannot be added.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from hyperrec.core.errors import ConfigError
from hyperrec.core.files import read_file


def server_credentials(cert: Path | None, key: Path | None, client_ca: Path | None) -> grpc.ServerCredentials | None:
    """TLS credentials from the PEM certificate chain `cert` and its private `key` (mutual TLS when a `client_ca`
    bundle is given), or None (plaintext) when either file is unset. ConfigError names the file at fault."""
    if cert is None or key is None:
        return None
    chain = read_file(cert, "tls_cert")
    key_pem = read_file(key, "tls_key")
    if b"-----BEGIN CERTIFICATE-----" not in chain:
        raise ConfigError(f"tls_cert {cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key_pem:
        raise ConfigError(f"tls_key {key} holds no PEM private key")
    roots = None if client_ca is None else read_file(client_ca, "tls_client_ca")
    try:
        return grpc.ssl_server_credentials(
            [(key_pem, chain)], root_certificates=roots, require_client_auth=roots is not None
        )
    except (ValueError, TypeError) as exc:  # grpcio checks little here; transport.bind reports unusable files
        raise ConfigError(f"cannot use the TLS files: {exc}") from exc
