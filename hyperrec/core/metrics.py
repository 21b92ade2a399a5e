"""Prometheus metrics (prometheus-client, default registry). Labels never carry user or item ids.

Names follow Prometheus conventions: `hyperrec_` prefix, counters end in `_total`, durations are histograms in
seconds. `config.metrics_port` serves them over HTTP; tests read them from the registry. deploy/grafana/ holds a
dashboard over them. With `--workers N` each worker writes them to PROMETHEUS_MULTIPROC_DIR and the supervisor
serves their sum (counters, histograms) or the mode each gauge names (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Latency buckets for a service whose target is single-digit milliseconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter(
    "hyperrec_grpc_requests_total",
    "gRPC calls answered, by full method name and status code (health and reflection excluded).",
    ["method", "code"],
)
# "Arrival" is the moment grpcio hands a call to the server's Python code (the gate): it includes the wait in the
# event loop and for a compute thread, but not the time grpc-core held the call before the Python server loop asked
# for it (bounded by `pending_calls`) nor the network. Refused calls are counted in REQUESTS, not timed.
REQUEST_DURATION = Histogram(
    "hyperrec_grpc_request_duration_seconds",
    "Time from a call's arrival at the server process (grpcio handing it to the gate) to its answer, every wait "
    "included, by full method name.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DURATION = Histogram(
    "hyperrec_grpc_queue_duration_seconds",
    "Time from a call's arrival (grpcio handing it to the gate) to its handler starting, by full method name.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "hyperrec_grpc_requests_in_flight", "Recommender and Profiles calls in progress.", multiprocess_mode="livesum"
)
CONCURRENCY_LIMIT = Gauge(
    "hyperrec_grpc_concurrency_limit",
    "The adaptive limit on Recommender and Profiles calls in progress at once (between min_in_flight and "
    "max_in_flight); calls beyond it are refused RESOURCE_EXHAUSTED.",
    multiprocess_mode="livesum",
)
LATENCY_BASELINE = Gauge(
    "hyperrec_grpc_latency_baseline_seconds",
    "The unloaded call latency the adaptive concurrency limit compares recent latency against.",
    multiprocess_mode="livemax",
)
STAGE_DURATION = Histogram(
    "hyperrec_stage_duration_seconds",
    "Time spent in each Recommend stage (profile, retrieval, ranking) and in total.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "hyperrec_batch_size",
    "Recommend calls computed together in one FAISS search and one ONNX Runtime run (dynamic micro-batching).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
CACHE_REQUESTS = Counter(
    "hyperrec_cache_requests_total",
    "Top-N cache lookups by result (hit, miss); the hit ratio is hit / (hit + miss). Only with cache_ttl_s > 0.",
    ["result"],
)
RECOMMENDATIONS = Counter(
    "hyperrec_recommendations_total", "Recommend answers by strategy and model version.", ["strategy", "model_version"]
)
RANKING_FALLBACKS = Counter(
    "hyperrec_ranking_fallbacks_total",
    "Answers left in retrieval order because ranking would not fit (reason: budget, deadline).",
    ["reason"],
)
PROFILE_DEGRADED = Counter(
    "hyperrec_profile_store_degraded_total",
    "Profile reads that gave up and served non-personalized (reason: error, timeout, circuit_open, loop_late).",
    ["reason"],
)
BREAKER_STATE = Gauge(
    "hyperrec_profile_store_breaker_state",
    "Profile store circuit breaker: 0 closed, 1 open, 2 half-open (with several workers: the highest).",
    multiprocess_mode="livemax",
)
EVENTS = Counter(
    "hyperrec_events_total",
    "Events received by RecordEvents, by outcome (accepted, duplicate, rejected, no_consent).",
    ["outcome"],
)
PRIVACY_ACTIONS = Counter(
    "hyperrec_privacy_actions_total", "Consent changes and erasures by action (opt_out, opt_in, forget).", ["action"]
)
MODEL_LOADS = Counter(
    "hyperrec_model_loads_total", "Model version loads by model and outcome (loaded, failed).", ["model", "outcome"]
)
ACTIVE_VERSION = Gauge(
    "hyperrec_model_active_version",
    "The model version being served (with several workers: one sample per worker, labelled pid).",
    ["model"],
    multiprocess_mode="liveall",
)
ACCELERATOR = Gauge(
    "hyperrec_accelerator_info",
    "1 for the device each component runs on (component: ranker, index; device: cpu, cuda, tensorrt).",
    ["component", "device"],
    multiprocess_mode="livemax",
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on `port` from a daemon thread."""
    start_http_server(port, addr=host)


PROFILE_BUDGET_MISSES = Counter(
    "hyperrec_profile_budget_misses_total",
    "Profile reads past their time budget, by cause: store (looked at on time, no answer; counts against the"
    " breaker) or local (the event loop was late; does not).",
    ["cause"],
)
