"""Capacity search: steady open-loop steps at rising rates; the capacity is the highest rate whose step met the SLO.

Each step is a complete run (its own warm-up, measurement and verdict), so a step's numbers do not blur into the
next. The search stops at the first step that breaches the SLO: beyond it the server is saturated and further
steps only queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hyperrec.loadtest.results import RunResult
from hyperrec.loadtest.runner import LoadTestSettings, run
from hyperrec.loadtest.slo import Check, Slo, evaluate, passed


@dataclass(frozen=True)
class Step:
    rate: float
    result: RunResult
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return passed(self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "passed": self.passed,
            "achieved_rate": self.result.achieved_rate,
            "error_rate": self.result.error_rate,
            "latency_ms": self.result.to_json(with_histograms=False)["latency_ms"],
            "strategies": dict(sorted(self.result.strategies.items())),
            "checks": [
                {"name": c.name, "threshold": c.threshold, "actual": c.actual, "passed": c.passed} for c in self.checks
            ],
        }


def search(
    settings: LoadTestSettings,
    rates: Sequence[float],
    slo: Slo,
    runner: Callable[[LoadTestSettings], RunResult] = run,
) -> tuple[float | None, list[Step]]:
    """Run `rates` in rising order until one breaches `slo`; return the highest passing rate (None if none did)
    and every step run."""
    steps: list[Step] = []
    capacity = None
    for rate in sorted(rates):
        result = runner(replace(settings, rate=rate, concurrency=None))
        step = Step(rate, result, tuple(evaluate(result, slo)))
        steps.append(step)
        if not step.passed:
            break
        capacity = rate
    return capacity, steps


def capacity_table(capacity: float | None, steps: Sequence[Step]) -> str:
    lines = [f"{'offered/s':>10}  {'achieved/s':>10}  {'p50 ms':>8}  {'p99 ms':>8}  {'errors':>7}  verdict"]
    for step in steps:
        latency = step.result.to_json(with_histograms=False)["latency_ms"]
        lines.append(
            f"{step.rate:>10,.0f}  {step.result.achieved_rate:>10,.1f}  {latency['p50']:>8.2f}  "
            f"{latency['p99']:>8.2f}  {step.result.error_rate:>7.2%}  {'PASS' if step.passed else 'FAIL'}"
        )
    lines.append(f"capacity: {capacity:,.0f}/s meets the SLO" if capacity else "capacity: no step met the SLO")
    return "\n".join(lines)
