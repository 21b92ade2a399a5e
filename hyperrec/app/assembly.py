"""Config -> components: the profile store, the bundle slot, the thread pools, the breaker, the pipeline, the
model manager and the profile service, wired together; and the settings the gRPC transport is built with.

Building does no I/O and loads nothing: the store connects on first use, and the lifecycle
(`hyperrec/app/lifecycle.py`) loads the model.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hyperrec.app.config import ServerConfig
from hyperrec.core import metrics
from hyperrec.core.batching import BatchSettings
from hyperrec.core.breaker import CircuitBreaker
from hyperrec.core.cache import CacheSettings
from hyperrec.core.domain import RequestLimits
from hyperrec.core.ingest import ProfileService
from hyperrec.core.model_manager import ModelManager, VersionLoadSettings
from hyperrec.core.pipeline import STORE_FAILURES, BundleSlot, PipelineOptions, RecommendPipeline
from hyperrec.core.profile import ProfileSettings
from hyperrec.core.profile_store import ProfileStore
from hyperrec.core.ranker import RankerOptions
from hyperrec.core.tokens import Token, parse_tokens
from hyperrec.index import set_threads
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.memory import InMemoryProfileStore
from hyperrec.profiles.redis_store import RedisProfileStore, RedisStoreOptions
from hyperrec.server.transport import TransportSettings


@dataclass(frozen=True)
class Components:
    """Everything a server's calls run on, built from one config; `release()` frees it."""

    store: ProfileStore
    slot: BundleSlot  # the active bundle (none until the lifecycle loads one)
    executor: ThreadPoolExecutor  # retrieval and ranking, off the event loop
    loader: ThreadPoolExecutor  # loading and warming model versions, off the event loop
    breaker: CircuitBreaker  # around the profile store
    pipeline: RecommendPipeline
    manager: ModelManager
    profile_service: ProfileService

    async def release(self) -> None:
        """Cancel queued work on both thread pools (without waiting for running work) and close the store."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.loader.shutdown(wait=False, cancel_futures=True)
        await self.store.close()


def build_profile_store(config: ServerConfig) -> ProfileStore:
    """Redis when a URL is configured, else the in-process store."""
    secret = config.profile_secret.encode() if config.profile_secret else secrets.token_bytes(32)
    pseudonymizer = Pseudonymizer(secret)
    settings = ProfileSettings(
        half_life_s=config.affinity_half_life_days * 86_400.0,
        recent_limit=config.recent_items,
        ttl_s=config.profile_ttl_s,
        dedupe_window_s=config.dedupe_window_s,
    )
    if config.redis_url:
        options = RedisStoreOptions(
            url=config.redis_url,
            connect_timeout_s=config.redis_connect_timeout_ms / 1e3,
            read_timeout_s=config.redis_read_timeout_ms / 1e3,
            settings=settings,
        )
        return RedisProfileStore(options, pseudonymizer)
    return InMemoryProfileStore(pseudonymizer, settings)


def index_pool(config: ServerConfig, workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads each set the index library's thread count first (FAISS: OpenMP threads, a
    per-thread setting, so it is set where searches run)."""
    return ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix=name, initializer=set_threads, initargs=(config.index_threads,)
    )


def pipeline_options(config: ServerConfig) -> PipelineOptions:
    """The Recommend pipeline's limits, budgets, batching and top-N cache."""
    return PipelineOptions(
        candidates=config.candidates,
        limits=RequestLimits(max_k=config.max_k, max_exclusions=config.max_exclusions),
        profile_budget_s=config.profile_budget_ms / 1e3,
        interest_events=config.interest_events,
        ranking_budget_s=config.ranking_budget_ms / 1e3,
        batching=BatchSettings(config.batch_max_size, config.batch_max_wait_us / 1e6, config.compute_threads),
        cache=CacheSettings(config.cache_ttl_s, config.cache_max_entries),
    )


def store_breaker(config: ServerConfig) -> CircuitBreaker:
    """The circuit breaker around the profile store, reporting its state as a metric."""
    breaker = CircuitBreaker(
        config.breaker_failures,
        config.breaker_open_s,
        on_change=lambda state: metrics.BREAKER_STATE.set(state),
        failures=STORE_FAILURES,
    )
    metrics.BREAKER_STATE.set(breaker.state)
    return breaker


def version_load_settings(config: ServerConfig) -> VersionLoadSettings:
    """How the model manager loads and warms a version."""
    return VersionLoadSettings(
        RankerOptions(config.ort_intra_op_threads, config.ort_inter_op_threads),
        config.warmup_requests,
        config.candidates,
        config.keep_previous_version,
        config.affinity_half_life_days * 86_400.0,
        config.index_device,
    )


def assemble(config: ServerConfig, profile_store: ProfileStore | None = None) -> Components:
    """The components `config` describes (with `profile_store` instead of the configured one when given)."""
    store = profile_store if profile_store is not None else build_profile_store(config)
    slot = BundleSlot()
    executor = index_pool(config, config.compute_threads, "hyperrec-compute")
    breaker = store_breaker(config)
    pipeline = RecommendPipeline(store, slot, pipeline_options(config), executor, breaker)
    loader = index_pool(config, 1, "hyperrec-loader")
    recorded = pipeline.recent_requests  # warm-up replays recent real request shapes
    manager = ModelManager(
        config.model_repo, config.model_name, slot, version_load_settings(config), loader, lambda: list(recorded)
    )
    profile_service = ProfileService(store, slot, breaker, config.max_events_per_batch)
    return Components(store, slot, executor, loader, breaker, pipeline, manager, profile_service)


def access_tokens(config: ServerConfig) -> tuple[Token, ...]:
    """The bearer tokens calls may present: `admin_token` (admin scope) and those of `auth_tokens`."""
    admin = (Token(config.admin_token, frozenset({"admin"})),) if config.admin_token else ()
    return (*admin, *parse_tokens(config.auth_tokens))


def transport_settings(config: ServerConfig) -> TransportSettings:
    """The gRPC transport's part of `config`."""
    return TransportSettings(
        host=config.host,
        port=config.port,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        tls_client_ca=config.tls_client_ca,
        max_message_bytes=config.max_message_bytes,
        max_connection_age_s=config.max_connection_age_s,
        health_port=config.health_port,
        tokens=access_tokens(config),
        max_in_flight=config.max_in_flight,
        min_in_flight=config.min_in_flight,
        latency_tolerance=config.latency_tolerance,
        limit_window_s=config.limit_window_s,
        compute_capacity=config.compute_threads,
        pending_calls=config.pending_calls,
    )
