"""Typed server configuration.

One `ServerConfig` is built in `main()` from, in rising precedence: field
defaults, an optional TOML file (`--config`), environment variables named
`HYPERREC_<FIELD>` (upper case), and command-line flags `--<field-with-dashes>`.
Every field's help text below is also its `--help` text and its documentation
(docs/configuration.md is generated from it by `hyperrec config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperrec.core.errors import ConfigError
from hyperrec.core.names import check_name
from hyperrec.core.tokens import MIN_TOKEN_BYTES, parse_tokens

ENV_PREFIX = "HYPERREC_"
# Old field names still read (TOML key, environment variable, flag, keyword) with a FutureWarning: old -> new.
RENAMED_FIELDS = {"faiss_threads": "index_threads"}


def _doc(help_text: str) -> dict[str, str]:
    return {"help": help_text}


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start. Build with `load_config`."""

    host: str = field(default="127.0.0.1", metadata=_doc("Address to listen on; 0.0.0.0 or [::] for all interfaces."))
    port: int = field(default=50051, metadata=_doc("gRPC port; 0 picks a free one (tests)."))
    workers: int = field(
        default=0,
        metadata=_doc(
            "Serving processes sharing `port` (SO_REUSEPORT), each with its own event loop, under one supervisor "
            "that owns signals, restarts, the health-only port and /metrics; 1: one process, no supervisor. "
            "0: one per CPU core the process may use when profiles are in Redis, else 1 (the in-process store "
            "cannot be shared between processes, so more than 1 needs redis_url)."
        ),
    )
    model_repo: Path = field(default=Path("model_repo"), metadata=_doc("Directory holding <model>/<version>/ bundles."))
    model_name: str = field(default="demo", metadata=_doc("Model to serve from the repository."))
    model_version: int | None = field(
        default=None,
        metadata=_doc(
            "Version this process serves, over the pin in the model's policy.json (this process only; "
            "an admin call on it lifts it); unset: policy.json's pin, else the newest."
        ),
    )
    redis_url: str | None = field(
        default=None, metadata=_doc("Redis URL for profiles (redis://host:port/db); unset uses the in-process store.")
    )
    profile_secret: str | None = field(
        default=None,
        metadata=_doc(
            "Secret (>= 16 bytes) keying the HMAC that pseudonymises user ids. Required with Redis; "
            "the in-process store makes a random one per process when unset."
        ),
    )
    profile_ttl_s: int = field(default=90 * 24 * 3600, metadata=_doc("Time to live of profile keys in Redis, seconds."))
    redis_connect_timeout_ms: float = field(default=200.0, metadata=_doc("Redis connect timeout, milliseconds."))
    redis_read_timeout_ms: float = field(default=100.0, metadata=_doc("Redis socket read timeout, milliseconds."))
    profile_budget_ms: float = field(
        default=50.0,
        metadata=_doc("Time budget for the profile read; past it the answer is non-personalized (DEGRADED)."),
    )
    recent_items: int = field(default=50, metadata=_doc("Recent items kept per profile and used for fold-in."))
    affinity_half_life_days: float = field(
        default=14.0, metadata=_doc("Half-life of the time decay of category affinities in profiles, days.")
    )
    dedupe_window_s: int = field(
        default=24 * 3600, metadata=_doc("How long an event id is remembered to drop retried events, seconds.")
    )
    max_events_per_batch: int = field(default=1000, metadata=_doc("Most events one RecordEvents call may carry."))
    interest_events: int = field(
        default=5,
        metadata=_doc("Known recent items after which declared interests no longer steer a user's recommendations."),
    )
    breaker_failures: int = field(
        default=5, metadata=_doc("Consecutive profile store failures or timeouts that open the circuit breaker.")
    )
    breaker_open_s: float = field(
        default=1.0,
        metadata=_doc("Time the open breaker skips the profile store before one probe call tests it again."),
    )
    health_port: int | None = field(
        default=None,
        metadata=_doc(
            "Optional second port on `host`, plaintext, serving only grpc.health.v1: for kubelet gRPC probes and "
            "the container health check when the main port speaks TLS or needs tokens. Unset: none."
        ),
    )
    metrics_port: int | None = field(
        default=None, metadata=_doc("Port serving Prometheus metrics at /metrics on `host`; unset serves none.")
    )
    candidates: int = field(default=500, metadata=_doc("Candidates retrieved from the ANN index and ranked."))
    max_k: int = field(default=100, metadata=_doc("Largest k a request may ask for."))
    max_exclusions: int = field(default=1000, metadata=_doc("Most item ids a request may exclude."))
    compute_threads: int = field(default=2, metadata=_doc("Threads running retrieval and ranking off the event loop."))
    index_device: str = field(
        default="auto",
        metadata=_doc(
            "Where the FAISS index searches: auto (the GPU when the gpu extra's FAISS sees one, else the CPU), "
            "cpu, or gpu (a version whose index cannot go to the GPU fails to load)."
        ),
    )
    batch_max_size: int = field(
        default=0,
        metadata=_doc(
            "Most concurrent Recommend calls computed together (one FAISS search, one ONNX Runtime run); 1 turns "
            "dynamic batching off; 0 chooses 16, on the CPU as on a GPU (measured in docs/performance.md)."
        ),
    )
    batch_max_wait_us: float = field(
        default=0.0,
        metadata=_doc(
            "Longest a call waits for others to join its batch while a compute thread is free but another batch is "
            "running, microseconds; 0: it leaves at once. While every compute thread is busy, calls gather anyway. "
            "A wait buys larger batches (worth trying with a GPU ranker) with latency: on the CPU 0 measured better "
            "(docs/performance.md)."
        ),
    )
    cache_ttl_s: float = field(
        default=0.0,
        metadata=_doc(
            "Top-N cache: reuse a user's personalized answer for the same profile, context segment (device, "
            "surface, daypart, country, features), k, exclusions and model version for this many seconds; 0: off. "
            "A new event or a model swap changes the key, so it never serves a stale profile or version."
        ),
    )
    cache_max_entries: int = field(default=100_000, metadata=_doc("Most answers the top-N cache holds (LRU)."))
    ort_intra_op_threads: int = field(default=1, metadata=_doc("ONNX Runtime intra-op threads per inference."))
    ort_inter_op_threads: int = field(default=1, metadata=_doc("ONNX Runtime inter-op threads."))
    index_threads: int = field(
        default=1,
        metadata=_doc("Threads one ANN index search may use (FAISS: OpenMP threads); formerly faiss_threads."),
    )
    warmup_requests: int = field(
        default=32,
        metadata=_doc(
            "Most warm-up requests run through a new version before it serves (recent real request shapes when "
            "there are any); rounds stop earlier once their median latency settles."
        ),
    )
    keep_previous_version: bool = field(
        default=True,
        metadata=_doc(
            "Keep the version a swap replaced loaded (READY) for an instant rollback; false frees it, halving "
            "steady memory at the cost of a reload on rollback."
        ),
    )
    watch_interval_s: float = field(
        default=5.0,
        metadata=_doc("How often the model repository is checked for new, removed or changed versions; 0: never."),
    )
    drain_s: float = field(
        default=1.0,
        metadata=_doc(
            "On SIGTERM, time health reports NOT_SERVING while calls are still accepted, so load balancers "
            "stop routing here before the server refuses calls."
        ),
    )
    grace_s: float = field(
        default=5.0,
        metadata=_doc(
            "When the drain ends, new calls are refused UNAVAILABLE and every call admitted before gets this long "
            "to finish before it is cut."
        ),
    )
    seed_profiles: Path | None = field(
        default=None, metadata=_doc("Optional profiles file (.npz from training) loaded into the store at start.")
    )
    admin_token: str | None = field(
        default=None,
        metadata=_doc(
            "Bearer token (>= 16 bytes) with the admin scope, the one the ModelAdmin service requires (the same as "
            "`admin:<token>` in auth_tokens); with no admin token every admin call is refused. Best passed as "
            "HYPERREC_ADMIN_TOKEN."
        ),
    )
    auth_tokens: str | None = field(
        default=None,
        metadata=_doc(
            "Bearer tokens with scopes, separated by spaces: `<scope>[+<scope>...]:<token>`, scopes `recommend`, "
            "`ingest`, `admin`. When any token grants `recommend` (or `ingest`), Recommender (or Profiles) calls "
            "need one; health and reflection never do. Best passed as HYPERREC_AUTH_TOKENS from a secret."
        ),
    )
    tls_cert: Path | None = field(
        default=None, metadata=_doc("PEM server certificate chain; with tls_key the port speaks TLS only.")
    )
    tls_key: Path | None = field(default=None, metadata=_doc("PEM private key of tls_cert."))
    tls_client_ca: Path | None = field(
        default=None,
        metadata=_doc("PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)."),
    )
    max_message_bytes: int = field(
        default=1 << 20,
        metadata=_doc("Largest request message accepted, bytes; larger ones are refused RESOURCE_EXHAUSTED."),
    )
    max_connection_age_s: float = field(
        default=300.0,
        metadata=_doc(
            "Close each client connection (HTTP/2 GOAWAY, in-flight calls finish) after about this long, so clients "
            "re-resolve and spread over new replicas; 0: never."
        ),
    )
    max_in_flight: int = field(
        default=64,
        metadata=_doc(
            "Most Recommender and Profiles calls in progress at once: the ceiling (and starting value) of the "
            "adaptive concurrency limit. Calls beyond the current limit are refused at once with "
            "RESOURCE_EXHAUSTED (retry elsewhere or later) instead of queueing behind the others."
        ),
    )
    min_in_flight: int = field(
        default=4,
        metadata=_doc(
            "Floor of the adaptive concurrency limit: however high latency rises, this many Recommender and "
            "Profiles calls may still be in progress at once (capped at max_in_flight)."
        ),
    )
    latency_tolerance: float = field(
        default=2.0,
        metadata=_doc(
            "The adaptive concurrency limit shrinks when the median call latency (arrival to answer) rises above "
            "this many times the unloaded latency (the lowest window median of the last 100 windows), and may "
            "grow while it stays below; at least 1."
        ),
    )
    limit_window_s: float = field(
        default=0.1,
        metadata=_doc(
            "How often the adaptive concurrency limit is recomputed from the latency of the calls completed "
            "since (a window also waits for 10 completed calls)."
        ),
    )
    pending_calls: int = field(
        default=5000,
        metadata=_doc(
            "Calls grpc-core may hold before the server's event loop takes them to the gate (which admits them or "
            "refuses them RESOURCE_EXHAUSTED at once); beyond it grpc-core drops calls itself and clients see "
            "CANCELLED. A last-resort bound on memory and on the time a burst waits to be refused."
        ),
    )
    ranking_budget_ms: float = field(
        default=100.0,
        metadata=_doc(
            "Ranking must finish this long after a call arrives (and before its deadline); past it, or when it "
            "would not fit, the answer keeps retrieval order (strategy UNRANKED)."
        ),
    )
    otlp_endpoint: str | None = field(
        default=None,
        metadata=_doc(
            "OTLP/gRPC collector (host:port) to send OpenTelemetry spans to, one per call and per Recommend stage; "
            "needs the `tracing` extra. Unset: no spans are exported."
        ),
    )
    log_format: str = field(default="text", metadata=_doc("Log format: text, or json (one object per line)."))
    log_level: str = field(default="INFO", metadata=_doc("Log level: DEBUG, INFO, WARNING or ERROR."))

    def check(self) -> None:
        """Raise ConfigError on values that cannot work."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range")
        for name in ("metrics_port", "health_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name} {value} is out of range")
        for name in (
            "candidates",
            "max_k",
            "max_exclusions",
            "compute_threads",
            "recent_items",
            "ort_intra_op_threads",
            "ort_inter_op_threads",
            "index_threads",
            "profile_ttl_s",
            "dedupe_window_s",
            "max_events_per_batch",
            "interest_events",
            "breaker_failures",
            "max_message_bytes",
            "max_in_flight",
            "min_in_flight",
            "pending_calls",
            "cache_max_entries",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        for name in (
            "profile_budget_ms",
            "redis_connect_timeout_ms",
            "redis_read_timeout_ms",
            "affinity_half_life_days",
            "breaker_open_s",
            "ranking_budget_ms",
            "limit_window_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number")
        if not (math.isfinite(self.latency_tolerance) and self.latency_tolerance >= 1):
            raise ConfigError("latency_tolerance must be a number of at least 1")
        for name in (
            "grace_s",
            "drain_s",
            "watch_interval_s",
            "max_connection_age_s",
            "batch_max_wait_us",
            "cache_ttl_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be zero or more seconds")
        try:
            check_name(self.model_name)
        except ValueError as exc:
            raise ConfigError(f"model_name: {exc}") from None
        if self.max_k > self.candidates:
            raise ConfigError("max_k must not exceed candidates")
        if self.workers < 0:
            raise ConfigError("workers must be 0 (one per core) or more")
        if self.workers > 1 and not self.redis_url:
            raise ConfigError("workers > 1 needs redis_url: each process would have its own in-process profile store")
        if self.redis_url and not self.profile_secret:
            raise ConfigError("profile_secret (HYPERREC_PROFILE_SECRET) is required with a Redis profile store")
        if self.profile_secret is not None and len(self.profile_secret.encode()) < 16:
            raise ConfigError("profile_secret must be at least 16 bytes")
        if self.admin_token is not None and len(self.admin_token.encode()) < MIN_TOKEN_BYTES:
            raise ConfigError(f"admin_token must be at least {MIN_TOKEN_BYTES} bytes")
        parse_tokens(self.auth_tokens)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.batch_max_size < 0:
            raise ConfigError("batch_max_size must be 0 (automatic) or more")
        if self.index_device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"index_device must be auto, cpu or gpu, not {self.index_device!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"unknown log_format {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"unknown log_level {self.log_level!r}")


def _base_type(tp: Any) -> type:
    """The concrete type of a field annotation, unwrapping `X | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return typing.cast(type, tp)


def _convert(name: str, tp: type, optional: bool, raw: Any) -> Any:
    """Typed value of `raw`; an empty string means "unset" for optional fields and is an error otherwise."""
    if raw is None or (isinstance(raw, str) and raw == ""):
        if optional:
            return None
        raise ConfigError(f"{name}: needs a value")
    try:
        if tp is bool:
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
        return tp(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {raw!r} as {tp.__name__}") from exc


def _is_optional(tp: Any) -> bool:
    return (isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union) and type(None) in typing.get_args(
        tp
    )


def _fields() -> dict[str, tuple[type, dataclasses.Field[Any]]]:
    hints = typing.get_type_hints(ServerConfig)
    return {f.name: (_base_type(hints[f.name]), f) for f in dataclasses.fields(ServerConfig)}


def _optional_fields() -> set[str]:
    hints = typing.get_type_hints(ServerConfig)
    return {name for name, tp in hints.items() if _is_optional(tp)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field (defaults left to `load_config`)."""
    parser.add_argument("--config", type=Path, help="TOML file with config fields (flags and env vars override it).")
    for old in RENAMED_FIELDS:
        parser.add_argument(f"--{old.replace('_', '-')}", dest=old, default=None, help=argparse.SUPPRESS)
    for name, (tp, f) in _fields().items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            metavar=tp.__name__.upper(),
            help=f"{f.metadata['help']} [env {ENV_PREFIX}{name.upper()}]",
        )


def load_config(
    args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> ServerConfig:
    """Merge defaults < TOML file < environment < flags < keyword overrides, then check."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    file = getattr(args, "config", None) if args is not None else None
    if file is not None:
        try:
            values.update(tomllib.loads(Path(file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {file}: {exc}") from exc
    known = _fields()
    values = _renamed(values, f"config file {file}")
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown config fields in {file}: {', '.join(sorted(unknown))}")
    for old, new in RENAMED_FIELDS.items():  # the old names first, so the new ones win where both are given
        if f"{ENV_PREFIX}{old.upper()}" in env:
            values[new] = env[f"{ENV_PREFIX}{old.upper()}"]
            _warn_renamed(f"{ENV_PREFIX}{old.upper()}", f"{ENV_PREFIX}{new.upper()}")
        if args is not None and getattr(args, old, None) is not None:
            values[new] = getattr(args, old)
            _warn_renamed(f"--{old.replace('_', '-')}", f"--{new.replace('_', '-')}")
    for name in known:
        if f"{ENV_PREFIX}{name.upper()}" in env:
            values[name] = env[f"{ENV_PREFIX}{name.upper()}"]
        if args is not None and getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    values.update(_renamed(overrides, "keyword arguments"))
    optional = _optional_fields()
    converted = {name: _convert(name, known[name][0], name in optional, raw) for name, raw in values.items()}
    config = ServerConfig(**converted)
    config.check()
    return config


def _warn_renamed(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated: use {new}", FutureWarning, stacklevel=3)


def _renamed(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`values` with old field names replaced by their new ones (warning about each); both names is an error."""
    out = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old in out:
            if new in out:
                raise ConfigError(f"{where}: {old} and {new} are the same setting; give only {new}")
            out[new] = out.pop(old)
            _warn_renamed(old, new)
    return out


def describe_fields() -> Sequence[tuple[str, str, str]]:
    """(flag name, default, help) for each field, for docs."""
    rows = []
    for name, (_, f) in _fields().items():
        default = "unset" if f.default is None else str(f.default)
        rows.append((name, default, str(f.metadata["help"])))
    return rows
