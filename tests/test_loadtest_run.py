"""The load tester against a real server: schedules, open and closed loops, worker processes, stalls counted
from the scheduled send time (no coordinated omission)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from hyperrec.loadtest.results import RunResult
from hyperrec.loadtest.runner import LoadTestSettings, parse_phases, phased_schedule, run, run_worker, schedule
from hyperrec.loadtest.scenario import RequestSource, Scenario, ScenarioError, load_scenario
from tests.helpers import publish_toy
from tests.serving import Running, running_server


@pytest.fixture
async def served(tmp_path: Path) -> Running:  # type: ignore[misc]
    publish_toy(tmp_path, model_name="toy")
    async with running_server(tmp_path, "toy") as running:
        yield running


def test_constant_schedule_is_evenly_spaced_and_poisson_has_the_right_mean() -> None:
    constant = schedule(100.0, 2.0, "constant", np.random.default_rng(0))
    assert len(constant) == 200 and np.allclose(np.diff(constant), 0.01)
    poisson = schedule(1000.0, 20.0, "poisson", np.random.default_rng(0))
    gaps = np.diff(poisson)
    assert abs(len(poisson) - 20_000) < 600 and abs(gaps.mean() - 0.001) < 5e-5
    assert abs(gaps.std() - 0.001) < 1e-4  # exponential gaps: std equals the mean
    assert poisson.max() < 20.0


def test_request_source_draws_zipf_users_unknown_users_and_weighted_contexts() -> None:
    scenario = Scenario(
        k=7,
        exclusions=3,
        unknown_user_share=0.2,
        contexts=({"device": "mobile", "weight": 3}, {"device": "tv", "surface": "home", "weight": 1}),
    )
    source = RequestSource(scenario, [f"u{n}" for n in range(100)], seed=1)
    requests = [source.next() for _ in range(5000)]
    unknown = sum(r.user_id.startswith("loadtest-new-") for r in requests) / len(requests)
    assert 0.17 < unknown < 0.23
    known = [r.user_id for r in requests if not r.user_id.startswith("loadtest-new-")]
    assert known.count("u0") > 5 * known.count("u9")  # Zipf: rank 1 far above rank 10
    mobile = sum(r.context.device_type == 1 for r in requests) / len(requests)
    assert 0.7 < mobile < 0.8
    assert all(r.k == 7 and len(r.exclude_item_ids) == 3 for r in requests)


def test_scenario_file_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("k: 5\nbogus: 1\n")
    with pytest.raises(ScenarioError, match="bogus"):
        load_scenario(path)
    path.write_text("contexts:\n  - {device: mobile, colour: red}\n")
    with pytest.raises(ScenarioError, match="colour"):
        load_scenario(path)
    path.write_text("k: 3\nexclusions: 2\ncontexts:\n  - {device: desktop}\n")
    assert load_scenario(path).k == 3


async def test_open_loop_sends_on_schedule_and_measures_every_answer(served: Running) -> None:
    settings = LoadTestSettings(target=f"127.0.0.1:{served.port}", rate=200.0, duration_s=1.5, warmup_s=0.5)
    result = await run_worker(settings, 0)
    assert result.offered == 300  # 200/s over the measured 1.5 s; the warm-up's 100 are not counted
    assert result.completed == 300 and result.status_counts == {"OK": 300}
    assert sorted(result.timeline) == [0, 1] and result.timeline[0].sent == 200
    summary = result.to_json(with_histograms=False)["latency_ms"]
    assert 0 < summary["p50"] <= summary["p99"] <= summary["max"] < 1000


async def test_closed_loop_keeps_the_concurrency_and_counts_errors(served: Running) -> None:
    settings = LoadTestSettings(target=f"127.0.0.1:{served.port}", concurrency=4, duration_s=1.0, warmup_s=0.2)
    result = await run_worker(settings, 0)
    assert result.completed == result.offered > 20 and result.errors == 0
    bad = LoadTestSettings(target=f"127.0.0.1:{served.port}", concurrency=2, duration_s=0.5, warmup_s=0.0)
    bad = LoadTestSettings(**{**bad.__dict__, "scenario": Scenario(k=1000)})  # k above the server's max_k
    failed = await run_worker(bad, 0)
    assert failed.status_counts.get("INVALID_ARGUMENT", 0) == failed.completed > 0 and failed.error_rate == 1.0


async def test_a_stall_shows_in_the_latency_of_requests_scheduled_during_it(served: Running) -> None:
    """Coordinated omission: while the process stalls nothing is sent, but the requests scheduled meanwhile are
    sent late and their latency counts from when they should have gone out."""
    settings = LoadTestSettings(target=f"127.0.0.1:{served.port}", rate=100.0, duration_s=2.0, warmup_s=0.2)
    loop = asyncio.get_running_loop()
    loop.call_later(1.2, time.sleep, 0.5)  # blocks client and server alike for half a second
    result = await run_worker(settings, 0)
    summary = result.to_json(with_histograms=False)["latency_ms"]
    assert result.offered == 200 and result.status_counts.get("OK") == 200
    assert summary["max"] >= 450  # the first request scheduled in the stall waited all of it
    late = sum(
        step.count_added_in_this_iter_step
        for step in result.histogram.get_recorded_iterator()
        if step.value_iterated_to >= 200_000  # microseconds
    )
    assert 20 <= late <= 60  # about the 50 requests scheduled in the half-second stall, minus the last ones


async def test_worker_processes_share_the_rate_and_results_merge(served: Running) -> None:
    settings = LoadTestSettings(target=f"127.0.0.1:{served.port}", rate=100.0, duration_s=1.0, warmup_s=0.3, workers=2)
    result = await asyncio.to_thread(run, settings)  # spawns two processes; the server keeps serving here
    assert result.offered == 100 and result.status_counts == {"OK": 100}
    assert result.settings["workers"] == 2 and result.settings["mode"] == "open"


def test_phases_follow_each_other_at_their_own_rates() -> None:
    plan = [(100.0, 1.0), (400.0, 0.5), (50.0, 2.0)]  # a warm-up, a burst, a calm
    offsets = phased_schedule(plan, workers=2, arrival="constant", rng=np.random.default_rng(0))
    counts = [int(((offsets >= a) & (offsets < b)).sum()) for a, b in ((0, 1), (1, 1.5), (1.5, 3.5))]
    assert counts == [50, 100, 50]  # each worker sends half of every phase's rate
    assert np.all(np.diff(offsets) > 0)
    assert parse_phases("250:10, 1250:10,125:10") == ((250.0, 10.0), (1250.0, 10.0), (125.0, 10.0))
    with pytest.raises(ValueError, match="'1250' is not RATE:SECONDS"):
        parse_phases("250:10,1250")
    with pytest.raises(ValueError, match="add up to the measured duration"):
        LoadTestSettings(target="x:1", phases=((10.0, 1.0),), duration_s=2.0).check()
    with pytest.raises(ValueError, match="give one of"):
        LoadTestSettings(target="x:1", rate=5.0, phases=((10.0, 1.0),), duration_s=1.0).check()


async def test_a_burst_phase_is_refused_and_refusals_are_timed_from_their_send(tmp_path: Path) -> None:
    """Phases over a real server whose admission refuses a burst: every refusal is counted in the burst's seconds,
    and the time each answer took from its actual send is kept per status (and survives the JSON round trip)."""
    publish_toy(tmp_path, model_name="toy")
    async with running_server(tmp_path, "toy", max_in_flight=1) as served:
        settings = LoadTestSettings(
            target=f"127.0.0.1:{served.port}",
            phases=((20.0, 1.0), (1000.0, 1.0), (20.0, 1.0)),
            duration_s=3.0,
            warmup_s=0.0,
            deadline_s=30.0,  # a busy test machine must not turn slow answers into DEADLINE_EXCEEDED here
        )
        result = await asyncio.to_thread(run, settings)  # the server keeps serving on this loop
    assert result.offered == result.completed and sum(result.status_counts.values()) == result.offered
    assert set(result.status_counts) == {"OK", "RESOURCE_EXHAUSTED"}
    refused = result.status_counts["RESOURCE_EXHAUSTED"]
    calm, burst = result.timeline[0], result.timeline[1]
    assert burst.errors > 10 * max(1, calm.errors)  # the refusals fall in the burst's second
    assert result.by_status["RESOURCE_EXHAUSTED"].get_total_count() == refused
    assert result.by_status["OK"].get_total_count() == result.status_counts["OK"]
    assert [e["label"] for e in result.events] == ["rate 20/s", "rate 1000/s", "rate 20/s"]
    assert [e["t"] for e in result.events] == [0.0, 1.0, 2.0]
    data = result.to_json()
    assert set(data["sent_to_answer_ms"]) == set(result.status_counts)
    again = RunResult.from_json(data)
    assert again.by_status["RESOURCE_EXHAUSTED"].get_total_count() == refused
    share = again.answered_within("RESOURCE_EXHAUSTED", 600.0)
    assert share == 1.0 and again.answered_within("RESOURCE_EXHAUSTED", 0.0) < 1.0
    assert again.answered_within("NOT_A_STATUS", 0.01) == 1.0
