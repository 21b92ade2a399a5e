"""Service level objectives for a load-test run: read from a YAML file, checked against a `RunResult`.

An SLO file names thresholds; each becomes one `Check` with the measured value next to it, so a verdict says
not just "breached" but which number missed by how much:

    latency_ms:              # percentile thresholds on OK answers, milliseconds
      p50: 5                 # keys among p50, p90, p99, p99.9, max
      p99: 10
    max_error_rate: 0.001    # share of answered requests that were not OK, 0..1
    min_achieved_rate: 950   # OK answers per second (absolute)
    min_achieved_ratio: 0.95 # OK answers / offered requests, 0..1

Every key is optional, but an SLO must set at least one threshold. Mistakes in the file (unknown keys, a
misspelt percentile, a threshold that is not a number) are errors that name the file and key: a typo must not
silently drop a check and let a slow run pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from hyperrec.loadtest.results import PERCENTILES, RunResult, summary_ms

LATENCY_KEYS: tuple[str, ...] = (*(name for name, _ in PERCENTILES), "max")
TOP_LEVEL_KEYS = ("latency_ms", "max_error_rate", "min_achieved_rate", "min_achieved_ratio")
ERROR_RATE = "error rate"
ACHIEVED_RATE = "achieved rate (OK/s)"
ACHIEVED_RATIO = "achieved / offered"


class SloError(ValueError):
    """An SLO file cannot be read or is invalid. The message names the file and, where one is at fault, the key."""

    def __init__(self, source: str, key: str | None, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source = source
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class Slo:
    """Thresholds a run must meet; None (or no latency entry) means that aspect is not checked.

    `latency_ms` holds (percentile name, milliseconds) pairs in the order of `LATENCY_KEYS`; a tuple rather than a
    dict keeps the SLO hashable and its checks in a stable order.
    """

    latency_ms: tuple[tuple[str, float], ...] = ()
    max_error_rate: float | None = None
    min_achieved_rate: float | None = None
    min_achieved_ratio: float | None = None


@dataclass(frozen=True)
class Check:
    """One threshold of an SLO against what the run measured: passed when `actual <comparison> threshold`.

    `actual` is NaN where the run gave nothing to measure (no OK answers for a latency check, no answers at all
    for the error rate, nothing offered for the ratio); such a check fails.
    """

    name: str
    threshold: float
    actual: float
    passed: bool
    comparison: str  # "<=" (an upper bound) or ">=" (a lower bound)


def latency_check_name(percentile: str) -> str:
    """The check name of a latency threshold, e.g. "p99 latency (ms)"."""
    return f"{percentile} latency (ms)"


def latency_percentile(check: Check) -> str | None:
    """The percentile name ("p99", "max") a latency check is about; None for other checks."""
    for key in LATENCY_KEYS:
        if check.name == latency_check_name(key):
            return key
    return None


def load_slo(path: str | Path) -> Slo:
    """Read and validate an SLO file (YAML). Raises SloError naming the file for unreadable or invalid files."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SloError(source, None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SloError(source, None, f"not valid YAML: {exc}") from exc
    return parse_slo(data, source)


def parse_slo(mapping: object, source: str) -> Slo:
    """Validate an SLO already parsed from YAML (or built in code); `source` names it in error messages."""
    if mapping is None:
        raise SloError(source, None, f"empty SLO: set at least one of {', '.join(TOP_LEVEL_KEYS)}")
    if not isinstance(mapping, Mapping):
        raise SloError(source, None, f"an SLO must be a mapping of {', '.join(TOP_LEVEL_KEYS)}")
    for key in mapping:
        if key not in TOP_LEVEL_KEYS:
            raise SloError(source, str(key), f"unknown key; expected one of {', '.join(TOP_LEVEL_KEYS)}")
    slo = Slo(
        latency_ms=_latency_thresholds(mapping.get("latency_ms"), source),
        max_error_rate=_optional_number(mapping, "max_error_rate", source, upper=1.0),
        min_achieved_rate=_optional_number(mapping, "min_achieved_rate", source),
        min_achieved_ratio=_optional_number(mapping, "min_achieved_ratio", source, upper=1.0),
    )
    if not slo.latency_ms and all(
        value is None for value in (slo.max_error_rate, slo.min_achieved_rate, slo.min_achieved_ratio)
    ):
        raise SloError(source, None, f"empty SLO: set at least one of {', '.join(TOP_LEVEL_KEYS)}")
    return slo


def _latency_thresholds(section: object, source: str) -> tuple[tuple[str, float], ...]:
    if section is None:
        return ()
    if not isinstance(section, Mapping):
        raise SloError(source, "latency_ms", f"must be a mapping of percentile to milliseconds ({_keys()})")
    for key in section:
        if str(key) not in LATENCY_KEYS:
            raise SloError(source, f"latency_ms.{key}", f"unknown percentile; expected one of {_keys()}")
    return tuple(
        (name, _number(section[name], f"latency_ms.{name}", source)) for name in LATENCY_KEYS if name in section
    )


def _keys() -> str:
    return ", ".join(LATENCY_KEYS)


def _optional_number(
    mapping: Mapping[object, object], key: str, source: str, upper: float | None = None
) -> float | None:
    value = mapping.get(key)
    return None if value is None else _number(value, key, source, upper)


def _number(value: object, key: str, source: str, upper: float | None = None) -> float:
    """A finite, non-negative threshold (at most `upper` when given). YAML booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SloError(source, key, f"must be a number, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise SloError(source, key, f"must be a finite number >= 0, not {value!r}")
    if upper is not None and number > upper:
        raise SloError(source, key, f"must be between 0 and {upper:g}, not {value!r}")
    return number


def evaluate(result: RunResult, slo: Slo) -> list[Check]:
    """Check a run against an SLO, latency first (in percentile order), then error rate, achieved rate and ratio.

    Latency percentiles are those of OK answers, each the top of its HDR bucket (at most 0.1 % above the
    recorded value), so the comparison errs towards failing. Nothing to measure fails a check rather than passing
    it: a run whose every request failed has no latency, and must not meet a latency SLO.
    """
    checks = [_latency_check(result, name, threshold) for name, threshold in slo.latency_ms]
    if slo.max_error_rate is not None:
        error_rate = result.error_rate if result.completed else math.nan
        checks.append(_check(ERROR_RATE, slo.max_error_rate, error_rate, "<="))
    if slo.min_achieved_rate is not None:
        checks.append(_check(ACHIEVED_RATE, slo.min_achieved_rate, result.achieved_rate, ">="))
    if slo.min_achieved_ratio is not None:
        ratio = result.achieved_rate / result.offered_rate if result.offered_rate > 0 else math.nan
        checks.append(_check(ACHIEVED_RATIO, slo.min_achieved_ratio, ratio, ">="))
    return checks


def _latency_check(result: RunResult, percentile: str, threshold: float) -> Check:
    # The histogram rather than status_counts decides "no OK answers": a result read from JSON written without
    # histograms has OK counts but no latencies, and must not pass on the zeros summary_ms reports for it.
    has_latencies = result.histogram.get_total_count() > 0
    actual = summary_ms(result.histogram)[percentile] if has_latencies else math.nan
    return _check(latency_check_name(percentile), threshold, actual, "<=")


def _check(name: str, threshold: float, actual: float, comparison: str) -> Check:
    if math.isnan(actual):
        ok = False
    elif comparison == "<=":
        ok = actual <= threshold
    else:
        ok = actual >= threshold
    return Check(name, threshold, actual, ok, comparison)


def passed(checks: Sequence[Check]) -> bool:
    """Whether every check passed (an empty list passes: nothing was asked)."""
    return all(check.passed for check in checks)


def verdict_line(checks: Sequence[Check]) -> str:
    """The verdict: "SLO met" or "SLO breached: N of M checks failed"."""
    failed = sum(not check.passed for check in checks)
    if failed:
        return f"SLO breached: {failed} of {len(checks)} checks failed"
    return "SLO met"


def format_value(value: float) -> str:
    """A threshold or measurement for display: up to six significant digits, "n/a" for nothing measured."""
    return "n/a" if math.isnan(value) else f"{value:.6g}"


def verdict_table(checks: Sequence[Check]) -> str:
    """A fixed-width table of the checks (check, threshold with its comparison, actual, PASS/FAIL) and the verdict."""
    header = ("check", "threshold", "actual", "result")
    rows = [
        (c.name, f"{c.comparison} {format_value(c.threshold)}", format_value(c.actual), "PASS" if c.passed else "FAIL")
        for c in checks
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, str, str, str]) -> str:
        name, threshold, actual, verdict = row
        return f"{name:<{widths[0]}}  {threshold:>{widths[1]}}  {actual:>{widths[2]}}  {verdict:<{widths[3]}}".rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows), "", verdict_line(checks)])
