"""Prometheus metrics (prometheus-client, default registry). Labels never carry user or item ids.

`config.metrics_port` serves them over HTTP; tests read them from the registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

RECOMMENDATIONS = Counter(
    "hyperrec_recommendations_total", "Recommend answers by strategy and model version.", ["strategy", "model_version"]
)
PROFILE_DEGRADED = Counter(
    "hyperrec_profile_store_degraded_total",
    "Profile reads that gave up and served non-personalized (reason: error, timeout, circuit_open).",
    ["reason"],
)
BREAKER_STATE = Gauge(
    "hyperrec_profile_store_breaker_state", "Profile store circuit breaker: 0 closed, 1 open, 2 half-open."
)
EVENTS = Counter(
    "hyperrec_events_total",
    "Events received by RecordEvents, by outcome (accepted, duplicate, rejected, no_consent).",
    ["outcome"],
)
PRIVACY_ACTIONS = Counter(
    "hyperrec_privacy_actions_total", "Consent changes and erasures by action (opt_out, opt_in, forget).", ["action"]
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on `port` from a daemon thread."""
    start_http_server(port, addr=host)


MODEL_LOADS = Counter(
    "hyperrec_model_loads_total", "Model version loads by model and outcome (loaded, failed).", ["model", "outcome"]
)
ACTIVE_VERSION = Gauge("hyperrec_model_active_version", "The model version being served.", ["model"])
