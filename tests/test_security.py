"""Security over a real server and real channels: TLS and mutual TLS with a CA made here, scoped bearer tokens
per service (refused before the request body is read), and the config errors of both. The request size limit is
tested with the other hostile input, in tests/test_hostile_input.py."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from hyperrec.app.config import ServerConfig, load_config
from hyperrec.app.lifecycle import build_server
from hyperrec.core.errors import ConfigError
from hyperrec.v1 import admin_pb2 as apb
from hyperrec.v1 import admin_pb2_grpc as apb_grpc
from hyperrec.v1 import profiles_pb2 as ppb
from hyperrec.v1 import profiles_pb2_grpc as ppb_grpc
from hyperrec.v1 import recommender_pb2 as pb
from hyperrec.v1 import recommender_pb2_grpc as pb_grpc
from tests.helpers import SERVING, health_status, publish_toy
from tests.serving import Running, request, running_server

RECOMMEND = "/hyperrec.v1.Recommender/Recommend"
TOK_R = "recommend-only-token-0123456789"
TOK_I = "ingest-only-token-0123456789"
TOK_RI = "recommend-ingest-token-0123456789"
TOK_A = "admin-token-0123456789abcdef"
AUTH_TOKENS = f"recommend:{TOK_R} ingest:{TOK_I} recommend+ingest:{TOK_RI}"
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


# --- a private PKI -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a root CA, a server certificate it signed (localhost, 127.0.0.1), a client certificate it
    signed, and an unrelated CA with a client certificate of its own."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
    *,
    server: bool = False,
) -> x509.Certificate:
    """A CA certificate (self-signed when `issuer` is None), or a leaf for a server or a client signed by `issuer`."""
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=issuer is not None,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=issuer is None,
                crl_sign=issuer is None,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if issuer is not None:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (_name("hyperrec test CA"), ca_key)
    other = (_name("unrelated test CA"), other_ca_key)
    server_key, client_key, other_client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    return Pki(
        ca=_write_cert(d / "ca.pem", _certificate("hyperrec test CA", ca_key)),
        server_cert=_write_cert(d / "server.pem", _certificate("localhost", server_key, ca, server=True)),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.pem", _certificate("client", client_key, ca)),
        client_key=_write_key(d / "client.key", client_key),
        other_ca=_write_cert(d / "other-ca.pem", _certificate("unrelated test CA", other_ca_key)),
        other_client_cert=_write_cert(d / "other-client.pem", _certificate("intruder", other_client_key, other)),
        other_client_key=_write_key(d / "other-client.key", other_client_key),
    )


# --- servers -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("security-repo")
    publish_toy(repo, n_items=100, dim=8)
    return repo


@pytest.fixture(scope="module")
async def tls_server(repo: Path, pki: Pki) -> AsyncIterator[Running]:
    """TLS only (its `channel` is plaintext, so it can never get an answer)."""
    async with running_server(repo, "toy", tls_cert=pki.server_cert, tls_key=pki.server_key) as running:
        yield running


@pytest.fixture(scope="module")
async def mtls_server(repo: Path, pki: Pki) -> AsyncIterator[Running]:
    async with running_server(
        repo, "toy", tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def token_server(repo: Path) -> AsyncIterator[Running]:
    async with running_server(repo, "toy", admin_token=TOK_A, auth_tokens=AUTH_TOKENS) as running:
        yield running


@pytest.fixture(scope="module")
async def open_server(repo: Path) -> AsyncIterator[Running]:
    """No client tokens and no admin token."""
    async with running_server(repo, "toy") as running:
        yield running


def tls_credentials(trust: Path, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    """Client credentials trusting the CA in `trust`, presenting `client` (cert, key) when given."""
    cert, key = (client[0].read_bytes(), client[1].read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=trust.read_bytes(), private_key=key, certificate_chain=cert)


@asynccontextmanager
async def tls_channel(port: int, credentials: grpc.ChannelCredentials) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.secure_channel(f"localhost:{port}", credentials)
    try:
        yield channel
    finally:
        await channel.close()


async def recommend(channel: grpc.aio.Channel, metadata: Metadata = ()) -> pb.RecommendResponse:
    stub: Any = pb_grpc.RecommenderStub(channel)
    reply: pb.RecommendResponse = await stub.Recommend(request("u-1", k=3), metadata=metadata, timeout=5)
    return reply


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


# --- TLS ---------------------------------------------------------------------------------------------------------


async def test_a_client_trusting_the_ca_gets_answers_over_tls(tls_server: Running, pki: Pki) -> None:
    async with tls_channel(tls_server.port, tls_credentials(pki.ca)) as channel:
        reply = await recommend(channel)
        assert len(reply.items) == 3
        assert await health_status(channel) == SERVING


async def test_a_plaintext_client_is_refused_promptly_by_the_tls_port(tls_server: Running) -> None:
    start = time.monotonic()
    err = await refused(tls_server.stub.Recommend(request("u-1"), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 4


async def test_a_client_trusting_another_ca_is_refused(tls_server: Running, pki: Pki) -> None:
    async with tls_channel(tls_server.port, tls_credentials(pki.other_ca)) as channel:
        err = await refused(recommend(channel))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_accepts_a_client_certificate_the_ca_signed(mtls_server: Running, pki: Pki) -> None:
    async with tls_channel(mtls_server.port, tls_credentials(pki.ca, (pki.client_cert, pki.client_key))) as channel:
        assert len((await recommend(channel)).items) == 3
        assert await health_status(channel) == SERVING


@pytest.mark.parametrize("client", ["none", "other-ca"])
async def test_mutual_tls_refuses_clients_without_a_certificate_the_ca_signed(
    mtls_server: Running, pki: Pki, client: str
) -> None:
    identity = None if client == "none" else (pki.other_client_cert, pki.other_client_key)
    async with tls_channel(mtls_server.port, tls_credentials(pki.ca, identity)) as channel:
        err = await refused(recommend(channel))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        health_err = await refused(health_status(channel))  # no exemption at the transport level
        assert health_err.code() == grpc.StatusCode.UNAVAILABLE


def _config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    return load_config(env={}, port=0, model_repo=tmp_path, model_name="toy", **overrides)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"tls_cert": "server.pem"}, "tls_cert and tls_key go together"),
        ({"tls_key": "server.key"}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca"),
    ],
)
def test_incomplete_tls_settings_are_config_errors(tmp_path: Path, fields: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _config(tmp_path, **{k: tmp_path / v for k, v in fields.items()})


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key", "tls_client_ca"])
def test_an_unreadable_tls_file_is_a_config_error_naming_it(tmp_path: Path, pki: Pki, missing: str) -> None:
    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    files[missing] = tmp_path / f"no-such-{missing}.pem"
    config = _config(tmp_path, **files)
    with pytest.raises(ConfigError) as err:
        build_server(config)
    assert missing in str(err.value) and f"no-such-{missing}.pem" in str(err.value)


def _garbage_tls(tmp_path: Path, pki: Pki, which: str) -> dict[str, Path]:
    files = {"tls_cert": pki.server_cert, "tls_key": pki.server_key}
    if which == "mismatched key":
        files["tls_key"] = pki.client_key  # a valid key, but not the certificate's
    else:
        files[which] = tmp_path / "garbage.pem"
        files[which].write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return files


@pytest.mark.parametrize("which", ["tls_cert", "tls_key", "mismatched key"])
def test_unusable_tls_files_are_config_errors(tmp_path: Path, pki: Pki, which: str) -> None:
    """grpcio takes any bytes in ssl_server_credentials and fails later, in add_secure_port, with a RuntimeError
    blaming the address: the server must say it is the TLS files, before anything listens."""
    config = _config(tmp_path, **_garbage_tls(tmp_path, pki, which))
    with pytest.raises(ConfigError, match=r"tls_key|tls_cert"):
        build_server(config)


def _serve(repo: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--port", "0", "--model-repo", str(repo), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def test_serve_with_an_invalid_certificate_exits_2_with_a_message(tmp_path: Path, pki: Pki) -> None:
    files = _garbage_tls(tmp_path, pki, "tls_cert")
    proc = _serve(tmp_path, "--tls-cert", str(files["tls_cert"]), "--tls-key", str(files["tls_key"]))
    assert (proc.returncode, "Traceback" in proc.stderr) == (2, False), proc.stderr[-2000:]


# --- scoped tokens -----------------------------------------------------------------------------------------------


def _refusal_has_request_id(err: grpc.aio.AioRpcError) -> None:
    trailing = err.trailing_metadata()
    request_id = trailing.get("x-request-id") if trailing is not None else None
    assert isinstance(request_id, str) and len(request_id) == 32, trailing
    assert f"request id {request_id}" in (err.details() or "")


@pytest.mark.parametrize(
    ("metadata", "code", "needle"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
        (bearer("not-a-configured-token-0123456789"), grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"),
        ((("authorization", f"Basic {TOK_R}"),), grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
        ((("authorization", TOK_R),), grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
        (bearer(TOK_I), grpc.StatusCode.PERMISSION_DENIED, "recommend scope"),
        (bearer(TOK_A), grpc.StatusCode.PERMISSION_DENIED, "recommend scope"),
    ],
    ids=["none", "invalid", "basic", "no-scheme", "ingest-only", "admin-only"],
)
async def test_recommend_refuses_calls_without_a_recommend_token(
    token_server: Running, metadata: Metadata, code: grpc.StatusCode, needle: str
) -> None:
    err = await refused(recommend(token_server.channel, metadata))
    assert err.code() == code
    assert needle in (err.details() or "")
    _refusal_has_request_id(err)


@pytest.mark.parametrize("token", [TOK_R, TOK_RI], ids=["recommend", "both"])
async def test_recommend_answers_a_token_with_the_recommend_scope(token_server: Running, token: str) -> None:
    assert len((await recommend(token_server.channel, bearer(token))).items) == 3


async def test_the_bearer_scheme_is_case_insensitive_but_the_token_is_not(token_server: Running) -> None:
    assert len((await recommend(token_server.channel, (("authorization", f"bearer  {TOK_R} "),))).items) == 3
    err = await refused(recommend(token_server.channel, bearer(TOK_R.upper())))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def _events(user: str) -> ppb.RecordEventsRequest:
    event = ppb.Event(event_id=f"{user}-e1", user_id=user, item_id="item-00001", type=ppb.EVENT_TYPE_CLICK)
    return ppb.RecordEventsRequest(events=[event])


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        (TOK_R, grpc.StatusCode.PERMISSION_DENIED),
        (TOK_A, grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=["none", "recommend-only", "admin-only"],
)
async def test_profiles_refuse_tokens_without_the_ingest_scope(
    token_server: Running, token: str | None, code: grpc.StatusCode
) -> None:
    stub: Any = ppb_grpc.ProfilesStub(token_server.channel)
    metadata = bearer(token) if token else ()
    err = await refused(stub.RecordEvents(_events("refused"), metadata=metadata, timeout=5))
    assert err.code() == code
    if code == grpc.StatusCode.PERMISSION_DENIED:
        assert "ingest scope" in (err.details() or "")
    _refusal_has_request_id(err)
    assert await token_server.app.store.get("refused") is None  # nothing was written


@pytest.mark.parametrize("token", [TOK_I, TOK_RI], ids=["ingest", "both"])
async def test_profiles_accept_tokens_with_the_ingest_scope(token_server: Running, token: str) -> None:
    stub: Any = ppb_grpc.ProfilesStub(token_server.channel)
    reply = await stub.RecordEvents(_events(f"user-{token[:6]}"), metadata=bearer(token), timeout=5)
    assert reply.accepted == 1


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (bearer(TOK_R), grpc.StatusCode.PERMISSION_DENIED),
        (bearer(TOK_RI), grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=["none", "recommend-only", "client"],
)
async def test_admin_refuses_client_tokens(token_server: Running, metadata: Metadata, code: grpc.StatusCode) -> None:
    stub: Any = apb_grpc.ModelAdminStub(token_server.channel)
    err = await refused(stub.ListModels(apb.ListModelsRequest(), metadata=metadata, timeout=5))
    assert err.code() == code
    _refusal_has_request_id(err)


async def test_admin_answers_the_admin_token(token_server: Running) -> None:
    stub: Any = apb_grpc.ModelAdminStub(token_server.channel)
    reply = await stub.ListModels(apb.ListModelsRequest(), metadata=bearer(TOK_A), timeout=5)
    assert [m.name for m in reply.models] == ["toy"]


async def test_health_and_reflection_need_no_token(token_server: Running) -> None:
    assert await health_status(token_server.channel) == SERVING
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(token_server.channel)  # type: ignore[arg-type]
    call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    services = {s.name async for reply in call for s in reply.list_services_response.service}
    assert {"hyperrec.v1.Recommender", "hyperrec.v1.Profiles", "grpc.health.v1.Health"} <= services


async def test_a_token_less_call_is_refused_before_its_body_is_parsed(token_server: Running) -> None:
    raw: Any = token_server.channel.unary_unary(RECOMMEND, request_serializer=None, response_deserializer=None)
    err = await refused(raw(b"\xff\xff", timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    _refusal_has_request_id(err)
    # The same bytes with a good token do reach the parser (so the refusal above really came first).
    err = await refused(raw(b"\xff\xff", metadata=bearer(TOK_R), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_refusals_are_counted_by_method_and_code(token_server: Running) -> None:
    labels = {"method": RECOMMEND, "code": "UNAUTHENTICATED"}
    before = REGISTRY.get_sample_value("hyperrec_grpc_requests_total", labels) or 0.0
    await refused(recommend(token_server.channel))
    await refused(recommend(token_server.channel, bearer("wrong-token-0123456789abcdef")))
    assert REGISTRY.get_sample_value("hyperrec_grpc_requests_total", labels) == before + 2


async def test_without_client_tokens_recommend_is_open_but_admin_is_closed(open_server: Running) -> None:
    assert len((await recommend(open_server.channel)).items) == 3
    stub: Any = apb_grpc.ModelAdminStub(open_server.channel)
    for metadata, reason in (((), "missing bearer token"), (bearer(TOK_A), "no token with the admin scope")):
        err = await refused(stub.ListModels(apb.ListModelsRequest(), metadata=metadata, timeout=5))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason in (err.details() or ""), err.details()
        _refusal_has_request_id(err)


BAD_AUTH_TOKENS = {
    "unknown scope": (f"write:{TOK_R}", "no scope or an unknown one"),
    "empty scope": (f":{TOK_R}", "no scope or an unknown one"),
    "short token": ("recommend:short", "at least 16 bytes"),
    "no colon": (TOK_R, "must read <scope>"),
    "empty token": ("recommend:", "must read <scope>"),
}


def _configured(tmp_path: Path, auth_tokens: str) -> None:
    """Load the config and create (then release) the server: a bad setting must fail in one of the two."""
    app, _ = build_server(_config(tmp_path, auth_tokens=auth_tokens))
    app.components.executor.shutdown()
    app.components.loader.shutdown()


@pytest.mark.parametrize("case", list(BAD_AUTH_TOKENS))
def test_bad_auth_tokens_are_config_errors(tmp_path: Path, case: str) -> None:
    raw, needle = BAD_AUTH_TOKENS[case]
    with pytest.raises(ConfigError, match=needle):
        _configured(tmp_path, raw)


def test_a_short_admin_token_is_refused_by_load_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="admin_token must be at least 16 bytes"):
        _config(tmp_path, admin_token="short")


def test_bad_auth_tokens_fail_in_load_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _config(tmp_path, auth_tokens="write:0123456789abcdef0123")


def test_auth_token_errors_do_not_echo_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _configured(tmp_path, TOK_R)
    assert TOK_R[:8] not in str(err.value)


def test_serve_with_bad_auth_tokens_exits_2_with_a_message(tmp_path: Path) -> None:
    proc = _serve(tmp_path, "--auth-tokens", f"write:{TOK_R}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "auth_tokens: an entry has no scope or an unknown one" in proc.stderr and "Traceback" not in proc.stderr
    assert TOK_R not in proc.stderr


# --- command-line clients and the health-only port ---------------------------------------------------------------


@pytest.fixture(scope="module")
async def locked_server(repo: Path, pki: Pki) -> AsyncIterator[tuple[Running, int]]:
    """Mutual TLS and tokens on the main port, plus a plaintext port answering only health checks."""
    from tests.conftest import free_port

    health_port = free_port()
    async with running_server(
        repo,
        "toy",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        auth_tokens=AUTH_TOKENS,
        health_port=health_port,
    ) as running:
        yield running, health_port


def _tls_flags(pki: Pki) -> list[str]:
    return ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]


async def test_the_health_port_answers_health_in_plaintext_and_nothing_else(
    locked_server: tuple[Running, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from hyperrec.app.cli import main

    _, health_port = locked_server
    assert await asyncio.to_thread(main, ["health", "--target", f"127.0.0.1:{health_port}"]) == 0
    monkeypatch.setenv("HYPERREC_HEALTH_PORT", str(health_port))  # the container health check's default target
    assert await asyncio.to_thread(main, ["health"]) == 0
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{health_port}")
    try:
        err = await refused(recommend(channel, bearer(TOK_R)))
    finally:
        await channel.close()
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # no Recommender on the health port


async def test_command_line_clients_speak_mutual_tls_with_tokens(
    locked_server: tuple[Running, int], pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import json

    from hyperrec.app.cli import main

    running, _ = locked_server
    target = f"localhost:{running.port}"
    assert await asyncio.to_thread(main, ["health", "--target", target]) == 1  # plaintext against TLS
    assert await asyncio.to_thread(main, ["health", "--target", target, *_tls_flags(pki)]) == 0
    recommend_args = ["recommend", "--target", target, *_tls_flags(pki), "--user", "u-1", "--k", "3"]
    assert await asyncio.to_thread(main, recommend_args) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*recommend_args, "--token", TOK_R]) == 0
    assert "strategy cold_start" in capsys.readouterr().out
    out = tmp_path / "lt"
    load = ["loadtest", "--target", target, *_tls_flags(pki), "--token", TOK_R]
    load += ["--rate", "20", "--duration", "1", "--warmup", "0", "--out", str(out)]
    assert await asyncio.to_thread(main, load) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["status_counts"] == {"OK": 20}
    assert result["settings"]["tls"] is True and TOK_R not in (out / "result.json").read_text()


def test_tls_handshake_failures_reach_the_json_log_as_json(repo: Path, pki: Pki) -> None:
    """gRPC's C core writes failed handshakes to standard error itself; with --log-format json they come out as
    JSON records (logger "stderr") like every other line, never as raw text in the middle of the log."""
    import json
    import os
    import signal

    from tests.conftest import free_port
    from tests.helpers import wait_until

    port = free_port()
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--port", str(port), "--model-repo", str(repo)]
    cmd += ["--model-name", "toy", "--log-format", "json", "--drain-s", "0", "--grace-s", "1"]
    cmd += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}  # grpc's default: it logs handshakes
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        target = f"localhost:{port}"
        secure = ["health", "--target", target, "--tls-ca", str(pki.ca)]
        from hyperrec.app.cli import main

        wait_until(lambda: main(secure) == 0, "the TLS server to say SERVING", timeout_s=60, interval_s=0.3)
        for _ in range(3):  # plaintext against TLS: the server's handshakes fail
            assert main(["health", "--target", target, "--timeout", "2"]) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, not only those that look like JSON
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r) for r in records)
    native = [r for r in records if r["logger"] == "stderr"]
    assert any("andshake" in r["message"] for r in native), err[-3000:]
    levels = {"E": "ERROR", "W": "WARNING", "I": "INFO"}
    assert all(r["level"] == levels.get(r["message"][:1], "WARNING") for r in native)
