"""Send load: open loop at a rate (constant or Poisson arrivals) or closed loop at a concurrency, from several
worker processes so one Python core does not cap the offered load.

Open loop: each worker computes its send schedule up front and fires every request at its scheduled time without
waiting for earlier answers; latency counts from the scheduled time, so when the server (or the client) stalls,
the requests that should have gone out meanwhile carry the stall in their latency instead of silently not being
sent (coordinated omission). Requests still unanswered at the end get their deadline to finish.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hyperrec.client.aio import AsyncRecommender, Request, open_recommender
from hyperrec.client.connect import Connection, TlsClient
from hyperrec.loadtest.actions import Action, ActionRunner
from hyperrec.loadtest.results import RunResult, merged
from hyperrec.loadtest.scenario import RequestSource, Scenario

MAX_IN_FLIGHT = 20_000  # per worker: beyond it a request is counted as CLIENT_OVERLOADED instead of sent


@dataclass(frozen=True)
class LoadTestSettings:
    target: str
    rate: float | None = None  # requests per second over all workers (open loop)
    # open loop in phases: (rate, seconds) one after another, measured as one run (the warm-up runs at the first
    # rate); an overload scenario, for example: [(250, 10), (1250, 10), (125, 10)]
    phases: tuple[tuple[float, float], ...] = ()
    concurrency: int | None = None  # callers (closed loop)
    arrival: str = "constant"  # or "poisson"
    duration_s: float = 10.0
    warmup_s: float = 2.0
    workers: int = 1
    deadline_s: float = 1.0
    seed: int = 0
    token: str | None = None  # sent with every Recommend
    admin_token: str | None = None  # for the admin actions
    tls: TlsClient = field(default_factory=TlsClient)
    scenario: Scenario = field(default_factory=Scenario)
    users: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()  # model swaps, commands: run by the parent at their times, marked as events
    start_at: float | None = None  # unix time all workers start at (set by `run`)

    def check(self) -> None:
        if (self.rate is not None) + (self.concurrency is not None) + bool(self.phases) != 1:
            raise ValueError("give one of a rate or rate phases (open loop) or a concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be positive")
        if any(not (rate > 0 and seconds > 0) for rate, seconds in self.phases):
            raise ValueError("every phase needs a positive rate and a positive duration")
        if self.phases and abs(sum(s for _, s in self.phases) - self.duration_s) > 1e-9:
            raise ValueError("the phases' durations must add up to the measured duration")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.arrival not in ("constant", "poisson"):
            raise ValueError("arrival must be constant or poisson")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.workers < 1 or self.deadline_s <= 0:
            raise ValueError("duration and deadline must be positive, warm-up >= 0, workers >= 1")

    def connection(self, admin: bool = False) -> Connection:
        return Connection(self.target, self.tls, self.admin_token if admin else self.token)

    def described(self) -> dict[str, Any]:
        """The settings as reported in the results (without the token and the user list)."""
        out = asdict(self)
        out.pop("token")
        out.pop("admin_token")
        out.pop("start_at")
        out["tls"] = self.tls.on
        out["users"] = len(self.users)
        out["actions"] = [f"{a.at_s:g}s: {a.label}" for a in self.actions]
        out["mode"] = "closed" if self.concurrency is not None else "open"
        return out

    @property
    def open_loop(self) -> bool:
        return self.concurrency is None

    def phase_plan(self) -> list[tuple[float, float]]:
        """(rate, seconds) over the whole run, warm-up first (at the first phase's rate); open loop only."""
        phases = list(self.phases) or [(float(self.rate or 0.0), self.duration_s)]
        return ([(phases[0][0], self.warmup_s)] if self.warmup_s > 0 else []) + phases


def parse_phases(text: str) -> tuple[tuple[float, float], ...]:
    """`RATE:SECONDS,RATE:SECONDS,...` -> ((rate, seconds), ...); ValueError naming the part that is not one."""
    phases = []
    for part in text.split(","):
        rate, sep, seconds = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            phases.append((float(rate), float(seconds)))
        except ValueError:
            raise ValueError(f"phase {part.strip()!r} is not RATE:SECONDS") from None
    return tuple(phases)


def phased_schedule(
    plan: list[tuple[float, float]], workers: int, arrival: str, rng: np.random.Generator
) -> np.ndarray:
    """One worker's send offsets over consecutive (rate, seconds) phases of the whole run's rate, each phase's
    schedule starting where the one before ended."""
    parts, start = [], 0.0
    for rate, seconds in plan:
        parts.append(start + schedule(rate / workers, seconds, arrival, rng))
        start += seconds
    return np.concatenate(parts) if parts else np.empty(0)


def schedule(rate: float, duration_s: float, arrival: str, rng: np.random.Generator) -> np.ndarray:
    """Send offsets in seconds within [0, duration): evenly spaced, or with exponential gaps (Poisson)."""
    expected = int(rate * duration_s)
    if arrival == "constant":
        return np.arange(expected, dtype=np.float64) / rate
    gaps = rng.exponential(1.0 / rate, size=int(expected * 1.5) + 16)
    times = np.cumsum(gaps) - gaps[0]
    while times[-1] < duration_s:  # rare: extend
        more = rng.exponential(1.0 / rate, size=expected + 16)
        times = np.concatenate([times, times[-1] + np.cumsum(more)])
    kept: np.ndarray = times[times < duration_s]
    return kept


async def run_worker(settings: LoadTestSettings, worker: int) -> RunResult:
    """One worker's share of the run, measured after the warm-up."""
    settings.check()
    total_s = settings.warmup_s + settings.duration_s
    result = RunResult(settings.described(), settings.duration_s)
    source = RequestSource(settings.scenario, settings.users, settings.seed * 1000 + worker)
    async with open_recommender(settings.connection(), settings.deadline_s) as client:
        start = time.perf_counter() + (0.05 if settings.start_at is None else max(0.0, settings.start_at - time.time()))
        if settings.open_loop:
            await _open_loop(client, settings, worker, source, result, start)
        else:
            await _closed_loop(client, settings, worker, source, result, start, total_s)
    return result


async def _open_loop(
    client: AsyncRecommender,
    settings: LoadTestSettings,
    worker: int,
    source: RequestSource,
    result: RunResult,
    start: float,
) -> None:
    plan = settings.phase_plan()
    rng = np.random.default_rng(settings.seed * 7919 + worker)
    offsets = phased_schedule(plan, settings.workers, settings.arrival, rng)
    offsets += rng.random() / (plan[0][0] / settings.workers) if settings.workers > 1 else 0.0  # stagger workers
    in_flight: set[asyncio.Task[None]] = set()

    async def send(request: Request, scheduled: float, measured: bool, second: int) -> None:
        sent = time.perf_counter()
        status, version, strategy = await client.recommend(request)
        if measured:
            answered = time.perf_counter()
            result.add(second, answered - scheduled, status, version, strategy, answered - sent)

    for offset in offsets:
        scheduled = start + float(offset)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        measured = offset >= settings.warmup_s
        second = int(offset - settings.warmup_s)
        if measured:
            result.scheduled(second)
        if len(in_flight) >= MAX_IN_FLIGHT:
            if measured:
                result.add(second, 0.0, "CLIENT_OVERLOADED")
            continue
        task = asyncio.ensure_future(send(source.next(), scheduled, measured, second))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)


async def _closed_loop(
    client: AsyncRecommender,
    settings: LoadTestSettings,
    worker: int,
    source: RequestSource,
    result: RunResult,
    start: float,
    total_s: float,
) -> None:
    assert settings.concurrency is not None
    callers = max(1, settings.concurrency // settings.workers + (worker < settings.concurrency % settings.workers))
    end = start + total_s

    async def caller() -> None:
        while (sent := time.perf_counter()) < end:
            offset = sent - start
            measured = offset >= settings.warmup_s
            second = int(offset - settings.warmup_s)
            if measured:
                result.scheduled(second)
            status, version, strategy = await client.recommend(source.next())
            if measured:
                latency = time.perf_counter() - sent
                result.add(second, latency, status, version, strategy, latency)

    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    await asyncio.gather(*(caller() for _ in range(callers)))


def _worker_main(settings: LoadTestSettings, worker: int) -> dict[str, Any]:
    """Entry point of a worker process: run, and hand the result back as JSON-ready data."""
    return asyncio.run(run_worker(settings, worker)).to_json()


def run(settings: LoadTestSettings) -> RunResult:
    """The whole run: one worker in this process, or `workers` processes whose results are merged. Actions run
    on a thread of this process at their times after the warm-up, and come back as the result's events."""
    settings.check()
    lead_s = 0.5 if settings.workers == 1 else 3.0  # time for workers to start and connect
    settings = replace(settings, start_at=time.time() + lead_s)
    actions = ActionRunner(settings.actions, settings.connection(admin=True))
    actions.start(time.perf_counter() + lead_s + settings.warmup_s)
    if settings.workers == 1:
        result = asyncio.run(run_worker(settings, 0))
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(settings.workers) as pool:
            parts = pool.starmap(_worker_main, [(settings, w) for w in range(settings.workers)])
        result = merged(RunResult.from_json(p) for p in parts)
    result.events.extend(actions.join())
    result.events.extend(phase_events(settings.phases))
    return result


def phase_events(phases: tuple[tuple[float, float], ...]) -> list[dict[str, Any]]:
    """Each phase's start as a timeline event (seconds after the warm-up), so reports mark the rate changes."""
    events, start = [], 0.0
    for rate, seconds in phases:
        events.append({"t": start, "label": f"rate {rate:g}/s", "ok": True})
        start += seconds
    return events


def write_json(result: RunResult, path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=1))
