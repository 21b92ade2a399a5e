"""What a load-test run measured: HDR latency histograms (merged across workers), status counts, a per-second
timeline and marked events. Serialisable to JSON, so workers hand results to the parent and SREs keep them.

Latencies are recorded in microseconds from each request's *scheduled* send time in open-loop runs (so a stalled
server cannot hide its stalls behind a stalled client: coordinated omission), from the actual send time in
closed-loop runs. Percentiles are reported in milliseconds. Beside them, every answer's time from its actual send
is kept per status code (`sent_to_answer_ms`): how fast refusals (RESOURCE_EXHAUSTED, UNAVAILABLE) come back, for
example, which the scheduled-time latency would mix with the client's own lateness under overload.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 600_000_000  # ten minutes: anything slower is clamped there
SIGNIFICANT_DIGITS = 3
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9))


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def record(histogram: HdrHistogram, latency_s: float) -> None:
    """Record one latency (seconds), clamped into the histogram's range."""
    histogram.record_value(min(max(int(latency_s * 1e6), LOWEST_US), HIGHEST_US))


def summary_ms(histogram: HdrHistogram, with_mean: bool = True) -> dict[str, float]:
    """p50, p90, p99, p99.9, max (and mean) in milliseconds; zeros for an empty histogram.

    Percentiles come from one pass over the histogram; the mean takes another (slow in hdrh), so per-second rows
    leave it out.
    """
    if histogram.get_total_count() == 0:
        return {name: 0.0 for name, _ in PERCENTILES} | {"max": 0.0} | ({"mean": 0.0} if with_mean else {})
    values = histogram.get_percentile_to_value_dict([p for _, p in PERCENTILES])
    out = {name: values[p] / 1e3 for name, p in PERCENTILES}
    out["max"] = histogram.get_max_value() / 1e3
    if with_mean:
        out["mean"] = histogram.get_mean_value() / 1e3
    return out


def encode(histogram: HdrHistogram) -> str:
    return base64.b64encode(histogram.encode()).decode("ascii") if histogram.get_total_count() else ""


def decode_into(histogram: HdrHistogram, encoded: str) -> None:
    if encoded:
        histogram.decode_and_add(base64.b64decode(encoded))


@dataclass
class Second:
    """One second of the run (counted by scheduled send time), after the warm-up."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    fallbacks: int = 0  # OK answers the server marked as a fallback (FALLBACK_STRATEGIES)
    histogram: HdrHistogram = field(default_factory=new_histogram)


# Answers that are OK on the wire but say a stage fell back: the profile store failed (degraded) or ranking did
# not fit its budget (unranked).
FALLBACK_STRATEGIES = ("degraded", "unranked")


def _count(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


@dataclass
class RunResult:
    """Everything one run (or one worker's share of it) measured. `merge` adds another worker's result."""

    settings: dict[str, Any]
    duration_s: float
    offered: int = 0  # requests scheduled after the warm-up
    completed: int = 0  # requests answered (any status, deadline and client overload included) after the warm-up
    histogram: HdrHistogram = field(default_factory=new_histogram)  # OK answers only
    status_counts: dict[str, int] = field(default_factory=dict)
    timeline: dict[int, Second] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)  # {"t": seconds, "label": text}
    versions: dict[str, int] = field(default_factory=dict)  # OK answers per model version that answered
    strategies: dict[str, int] = field(default_factory=dict)  # OK answers per strategy (personalized, degraded...)
    by_status: dict[str, HdrHistogram] = field(default_factory=dict)  # time from the actual send, per status

    def add(
        self,
        second: int,
        latency_s: float,
        status: str,
        version: str = "",
        strategy: str = "",
        sent_to_answer_s: float | None = None,
    ) -> None:
        """Count one answered request scheduled in `second` (seconds since the end of the warm-up); `latency_s`
        counts from the scheduled time, `sent_to_answer_s` (when the request was sent at all) from the send."""
        self.completed += 1
        if sent_to_answer_s is not None:
            histogram = self.by_status.get(status)
            if histogram is None:
                histogram = self.by_status[status] = new_histogram()
            record(histogram, sent_to_answer_s)
        if version:
            _count(self.versions, version)
        if strategy:
            _count(self.strategies, strategy)
        _count(self.status_counts, status)
        slot = self.timeline.setdefault(second, Second())
        if status == "OK":
            record(self.histogram, latency_s)
            record(slot.histogram, latency_s)
            slot.ok += 1
            slot.fallbacks += strategy in FALLBACK_STRATEGIES
        else:
            slot.errors += 1

    def scheduled(self, second: int) -> None:
        self.offered += 1
        self.timeline.setdefault(second, Second()).sent += 1

    def merge(self, other: RunResult) -> None:
        self.offered += other.offered
        self.completed += other.completed
        self.histogram.add(other.histogram)
        for status, count in other.status_counts.items():
            _count(self.status_counts, status, count)
        for second, theirs in other.timeline.items():
            mine = self.timeline.setdefault(second, Second())
            mine.sent += theirs.sent
            mine.ok += theirs.ok
            mine.errors += theirs.errors
            mine.fallbacks += theirs.fallbacks
            mine.histogram.add(theirs.histogram)
        self.events.extend(other.events)
        for version, count in other.versions.items():
            _count(self.versions, version, count)
        for strategy, count in other.strategies.items():
            _count(self.strategies, strategy, count)
        for status, histogram in other.by_status.items():
            self.by_status.setdefault(status, new_histogram()).add(histogram)

    def answered_within(self, status: str, seconds: float) -> float:
        """The share of `status` answers that came back within `seconds` of being sent (1.0 when there were none)."""
        histogram = self.by_status.get(status)
        if histogram is None or histogram.get_total_count() == 0:
            return 1.0
        limit = histogram.get_highest_equivalent_value(int(seconds * 1e6))  # at the histogram's resolution
        steps = histogram.get_recorded_iterator()
        within = sum(step.count_added_in_this_iter_step for step in steps if step.value_iterated_to <= limit)
        return float(within / histogram.get_total_count())

    @property
    def errors(self) -> int:
        return sum(count for status, count in self.status_counts.items() if status != "OK")

    @property
    def error_rate(self) -> float:
        return self.errors / self.completed if self.completed else 0.0

    @property
    def offered_rate(self) -> float:
        return self.offered / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def achieved_rate(self) -> float:
        """OK answers per second over the measured duration."""
        return self.status_counts.get("OK", 0) / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self, with_histograms: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "settings": self.settings,
            "duration_s": self.duration_s,
            "offered": self.offered,
            "completed": self.completed,
            "offered_rate": self.offered_rate,
            "achieved_rate": self.achieved_rate,
            "error_rate": self.error_rate,
            "latency_ms": summary_ms(self.histogram),
            "status_counts": dict(sorted(self.status_counts.items())),
            "model_versions": dict(sorted(self.versions.items())),
            "strategies": dict(sorted(self.strategies.items())),
            "sent_to_answer_ms": {status: summary_ms(h) for status, h in sorted(self.by_status.items())},
            "timeline": [
                {"t": t, "sent": s.sent, "ok": s.ok, "errors": s.errors, "fallbacks": s.fallbacks}
                | {"latency_ms": summary_ms(s.histogram, False)}
                | ({"histogram": encode(s.histogram)} if with_histograms else {})
                for t, s in sorted(self.timeline.items())
            ],
            "events": sorted(self.events, key=lambda e: float(e["t"])),
        }
        if with_histograms:
            out["histogram"] = encode(self.histogram)
            out["sent_to_answer_histograms"] = {status: encode(h) for status, h in sorted(self.by_status.items())}
        return out

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> RunResult:
        """Inverse of `to_json()` with histograms (a summary written without them cannot be re-read)."""
        if "histogram" not in data:
            raise ValueError("this result was written without histograms; percentiles cannot be recomputed")
        result = RunResult(dict(data["settings"]), float(data["duration_s"]))
        result.offered, result.completed = int(data["offered"]), int(data["completed"])
        decode_into(result.histogram, data.get("histogram", ""))
        result.status_counts = {str(k): int(v) for k, v in data["status_counts"].items()}
        for row in data["timeline"]:
            second = Second(int(row["sent"]), int(row["ok"]), int(row["errors"]), int(row.get("fallbacks", 0)))
            decode_into(second.histogram, row.get("histogram", ""))
            result.timeline[int(row["t"])] = second
        result.events = [dict(e) for e in data.get("events", [])]
        result.versions = {str(k): int(v) for k, v in data.get("model_versions", {}).items()}
        result.strategies = {str(k): int(v) for k, v in data.get("strategies", {}).items()}
        for status, encoded in data.get("sent_to_answer_histograms", {}).items():
            decode_into(result.by_status.setdefault(str(status), new_histogram()), encoded)
        return result


def merged(parts: Iterable[RunResult]) -> RunResult:
    """One result from the workers' results (same settings and duration)."""
    items = list(parts)
    total = RunResult(dict(items[0].settings), items[0].duration_s)
    for part in items:
        total.merge(part)
    return total
