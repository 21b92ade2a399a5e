"""Load-test results, SLO files and verdicts, and the report: on hand-built results with known latencies."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hyperrec.loadtest.report import write_report
from hyperrec.loadtest.results import RunResult, merged, summary_ms
from hyperrec.loadtest.slo import (
    ACHIEVED_RATE,
    ACHIEVED_RATIO,
    ERROR_RATE,
    Check,
    Slo,
    SloError,
    evaluate,
    latency_check_name,
    load_slo,
    parse_slo,
    passed,
    verdict_table,
)

HDR_PRECISION = 1e-3  # three significant digits
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS = {"mode": "open", "rate": 200, "duration_s": 5, "target": "127.0.0.1:50051"}


def uniform_result(errors: int = 0, unanswered: int = 0) -> RunResult:
    """1,000 OK answers at 1..1000 ms over five seconds (200 a second, second s holding 200s+1..200s+200 ms), plus
    `errors` UNAVAILABLE answers and `unanswered` requests scheduled but never answered, in the last second."""
    result = RunResult(dict(SETTINGS), duration_s=5.0)
    for ms in range(1, 1001):
        second = (ms - 1) // 200
        result.scheduled(second)
        result.add(second, ms / 1000, "OK")
    for _ in range(errors):
        result.scheduled(4)
        result.add(4, 0.002, "UNAVAILABLE")
    for _ in range(unanswered):
        result.scheduled(4)
    return result


def errors_only() -> RunResult:
    result = RunResult(dict(SETTINGS), duration_s=2.0)
    for i in range(50):
        result.scheduled(i % 2)
        result.add(i % 2, 0.001, "UNAVAILABLE")
    return result


# --- results ------------------------------------------------------------------------------------------------------


def test_percentiles_of_known_latencies() -> None:
    summary = uniform_result().to_json()["latency_ms"]
    expected = {"p50": 500, "p90": 900, "p99": 990, "p99.9": 999, "max": 1000, "mean": 500.5}
    for name, value in expected.items():
        assert summary[name] == pytest.approx(value, rel=HDR_PRECISION), name


def test_timeline_per_second() -> None:
    data = uniform_result(errors=3).to_json()
    timeline = data["timeline"]
    assert [row["t"] for row in timeline] == list(range(5))
    assert [row["sent"] for row in timeline] == [200] * 4 + [203]
    assert [row["ok"] for row in timeline] == [200] * 5
    assert [row["errors"] for row in timeline] == [0] * 4 + [3]
    second = timeline[1]["latency_ms"]  # 201..400 ms
    assert second["p50"] == pytest.approx(300, rel=HDR_PRECISION)
    assert second["max"] == pytest.approx(400, rel=HDR_PRECISION)
    assert data["status_counts"] == {"OK": 1000, "UNAVAILABLE": 3}
    assert data["offered_rate"] == pytest.approx(200.6)
    assert data["achieved_rate"] == pytest.approx(200.0)
    assert data["error_rate"] == pytest.approx(3 / 1003)


def test_merge_of_workers_equals_one_result() -> None:
    single = RunResult(dict(SETTINGS), duration_s=5.0)
    workers = [RunResult(dict(SETTINGS), duration_s=5.0) for _ in range(2)]
    for ms in range(1, 1001):
        second = (ms - 1) // 200
        status = "DEADLINE_EXCEEDED" if ms % 97 == 0 else "OK"
        for result in (single, workers[ms % 2]):
            result.scheduled(second)
            result.add(second, ms / 1000, status)
    combined = merged(workers)
    assert combined.histogram.get_total_count() == single.histogram.get_total_count()
    assert combined.to_json(with_histograms=False) == single.to_json(with_histograms=False)
    for t, slot in single.timeline.items():
        assert summary_ms(combined.timeline[t].histogram) == summary_ms(slot.histogram)
    assert combined.status_counts == {"OK": 990, "DEADLINE_EXCEEDED": 10}


def test_json_round_trip_keeps_percentiles_and_counts() -> None:
    original = uniform_result(errors=5, unanswered=7)
    original.events.append({"t": 2.5, "label": "kill redis"})
    data = json.loads(json.dumps(original.to_json()))
    restored = RunResult.from_json(data)
    assert restored.to_json() == original.to_json()
    assert restored.histogram.get_total_count() == 1000
    assert restored.offered == 1012 and restored.completed == 1005
    assert summary_ms(restored.timeline[3].histogram) == summary_ms(original.timeline[3].histogram)


# --- SLO files ----------------------------------------------------------------------------------------------------

VALID_SLO = """\
latency_ms:
  p99: 10
  p50: 5
  p99.9: 25.5
max_error_rate: 0.001
min_achieved_rate: 950
min_achieved_ratio: 0.95
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slo.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_valid_slo(tmp_path: Path) -> None:
    slo = load_slo(write(tmp_path, VALID_SLO))
    assert slo == Slo(
        latency_ms=(("p50", 5.0), ("p99", 10.0), ("p99.9", 25.5)),  # percentile order, not file order
        max_error_rate=0.001,
        min_achieved_rate=950.0,
        min_achieved_ratio=0.95,
    )


def test_optional_keys_may_be_left_out(tmp_path: Path) -> None:
    assert load_slo(write(tmp_path, "latency_ms:\n  max: 100\n")) == Slo(latency_ms=(("max", 100.0),))
    assert load_slo(write(tmp_path, "max_error_rate: 0\n")) == Slo(max_error_rate=0.0)
    assert parse_slo({"min_achieved_ratio": 1}, "inline") == Slo(min_achieved_ratio=1.0)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("latency_ms:\n  p95: 5\n", "latency_ms.p95"),  # unknown percentile
        ("latency_ms:\n  p99: fast\n", "latency_ms.p99"),  # not a number
        ("latency_ms:\n  p99: -1\n", "latency_ms.p99"),  # negative
        ("latency_ms:\n  p99: .nan\n", "latency_ms.p99"),
        ("latency_ms:\n  p99: true\n", "latency_ms.p99"),  # YAML booleans are not thresholds
        ("latency_ms: 5\n", "latency_ms"),  # not a mapping
        ("max_error_rate: 1.5\n", "max_error_rate"),
        ("max_error_rate: -0.1\n", "max_error_rate"),
        ("max_error_rate: '1%'\n", "max_error_rate"),
        ("min_achieved_rate: -5\n", "min_achieved_rate"),
        ("min_achieved_ratio: 2\n", "min_achieved_ratio"),
        ("max_latency_ms: 5\n", "max_latency_ms"),  # unknown key
        ("", "empty SLO"),
        ("latency_ms: {}\n", "empty SLO"),
        ("- p99\n", "mapping"),
        ("latency_ms: [\n", "not valid YAML"),
    ],
)
def test_invalid_slo_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SloError) as caught:
        load_slo(path)
    assert str(path) in str(caught.value)
    assert key in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_missing_slo_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SloError, match="cannot read") as caught:
        load_slo(path)
    assert str(path) in str(caught.value)


# --- evaluation ---------------------------------------------------------------------------------------------------

FULL_SLO = Slo(
    latency_ms=(("p50", 600.0), ("p99", 1000.0), ("max", 1100.0)),
    max_error_rate=0.01,
    min_achieved_rate=200.0,  # exactly what uniform_result achieves: >= passes
    min_achieved_ratio=0.95,
)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_passing_run() -> None:
    checks = evaluate(uniform_result(), FULL_SLO)
    assert [c.name for c in checks] == [
        latency_check_name("p50"),
        latency_check_name("p99"),
        latency_check_name("max"),
        ERROR_RATE,
        ACHIEVED_RATE,
        ACHIEVED_RATIO,
    ]
    assert all(c.passed for c in checks) and passed(checks)
    found = by_name(checks)
    assert found[latency_check_name("p99")].actual == pytest.approx(990, rel=HDR_PRECISION)
    assert found[latency_check_name("p99")].comparison == "<="
    assert found[ACHIEVED_RATE].actual == pytest.approx(200.0)
    assert found[ACHIEVED_RATE].comparison == ">="
    assert found[ACHIEVED_RATIO].actual == pytest.approx(1.0)


def test_latency_breach() -> None:
    checks = by_name(evaluate(uniform_result(), Slo(latency_ms=(("p50", 600.0), ("p99", 500.0)))))
    assert checks[latency_check_name("p50")].passed
    breach = checks[latency_check_name("p99")]
    assert not breach.passed and breach.threshold == 500.0
    assert breach.actual == pytest.approx(990, rel=HDR_PRECISION)


def test_zero_ok_answers_fail_every_latency_check() -> None:
    slo = Slo(latency_ms=(("p50", 1e9), ("p99", 1e9), ("max", 1e9)), max_error_rate=0.5)
    checks = evaluate(errors_only(), slo)
    assert not any(c.passed for c in checks)
    assert all(math.isnan(c.actual) for c in checks if c.name != ERROR_RATE)
    assert by_name(checks)[ERROR_RATE].actual == 1.0


def test_nothing_answered_fails_the_error_rate() -> None:
    result = RunResult(dict(SETTINGS), duration_s=1.0)
    result.scheduled(0)
    (check,) = evaluate(result, Slo(max_error_rate=0.5))
    assert not check.passed and math.isnan(check.actual)


def test_a_summary_without_histograms_cannot_be_reread_as_a_result() -> None:
    """Re-reading it would give all-zero latencies that could pass an SLO vacuously."""
    with pytest.raises(ValueError, match="without histograms"):
        RunResult.from_json(uniform_result().to_json(with_histograms=False))


def test_a_result_without_ok_answers_fails_latency_checks() -> None:
    only_errors = RunResult(dict(SETTINGS), duration_s=1.0)
    for _ in range(5):
        only_errors.scheduled(0)
        only_errors.add(0, 0.01, "UNAVAILABLE")
    (check,) = evaluate(only_errors, Slo(latency_ms=(("p99", 1e9),)))
    assert not check.passed


def test_error_rate_breach() -> None:
    checks = by_name(evaluate(uniform_result(errors=20), FULL_SLO))
    assert not checks[ERROR_RATE].passed
    assert checks[ERROR_RATE].actual == pytest.approx(20 / 1020)
    assert checks[latency_check_name("p99")].passed


def test_achieved_ratio_breach() -> None:
    result = uniform_result(unanswered=100)  # 1,100 offered, 1,000 OK
    checks = by_name(evaluate(result, FULL_SLO))
    assert not checks[ACHIEVED_RATIO].passed
    assert checks[ACHIEVED_RATIO].actual == pytest.approx(1000 / 1100)
    assert checks[ACHIEVED_RATE].passed  # 200 OK/s still meets the absolute rate
    assert checks[ERROR_RATE].passed  # unanswered requests are not answers


def test_achieved_rate_breach() -> None:
    (check,) = evaluate(uniform_result(), Slo(min_achieved_rate=200.5))
    assert not check.passed and check.comparison == ">="


# --- verdict table ------------------------------------------------------------------------------------------------


def test_verdict_table_met() -> None:
    table = verdict_table(evaluate(uniform_result(), FULL_SLO))
    lines = table.splitlines()
    assert lines[0].split() == ["check", "threshold", "actual", "result"]
    assert lines[-1] == "SLO met"
    assert "FAIL" not in table and table.count("PASS") == 6
    assert "p99 latency (ms)" in table and "<= 1000" in table and ">= 200" in table


def test_verdict_table_breached() -> None:
    slo = Slo(latency_ms=(("p50", 600.0), ("p99", 500.0)), max_error_rate=0.001, min_achieved_ratio=0.5)
    table = verdict_table(evaluate(uniform_result(errors=20), slo))
    lines = table.splitlines()
    assert lines[-1] == "SLO breached: 2 of 4 checks failed"
    rows = lines[2:-2]
    assert len(rows) == 4
    assert [row.split()[-1] for row in rows] == ["PASS", "FAIL", "FAIL", "PASS"]
    # Fixed width: the result column starts at the same place on every row.
    starts = {row.rindex("PASS") if row.endswith("PASS") else row.rindex("FAIL") for row in rows}
    assert starts == {lines[0].index("result")}
    assert re.search(r"p99 latency \(ms\)\s+<= 500\s+990\.\d+\s+FAIL", table)


def test_verdict_table_shows_missing_values() -> None:
    table = verdict_table(evaluate(errors_only(), Slo(latency_ms=(("p99", 10.0),))))
    assert "n/a" in table and table.endswith("SLO breached: 1 of 1 checks failed")


# --- report -------------------------------------------------------------------------------------------------------


def test_report_writes_plots_and_self_contained_html(tmp_path: Path) -> None:
    result = uniform_result(errors=20)
    result.events.extend([{"t": 1.0, "label": "kill redis"}, {"t": 3.5, "label": "restart <redis> & co"}])
    slo = Slo(latency_ms=(("p50", 600.0), ("p99", 500.0)), max_error_rate=0.001, min_achieved_ratio=0.5)
    paths = write_report(result, evaluate(result, slo), tmp_path / "out")
    names = {"latency_over_time.png", "latency_histogram.png", "achieved_rate.png", "report.html"}
    assert set(paths) == names
    assert {p.name for p in (tmp_path / "out").iterdir()} == names
    assert all(path.name == name and path.parent == tmp_path / "out" for name, path in paths.items())
    for name in ("latency_over_time.png", "latency_histogram.png", "achieved_rate.png"):
        assert paths[name].read_bytes().startswith(PNG_SIGNATURE)
    page = paths["report.html"].read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 3
    assert "http" not in page  # no external assets: no links, scripts, fonts or stylesheets
    assert "SLO breached: 2 of 4 checks failed" in page
    assert 'class="banner fail"' in page and '<tr class="fail">' in page and '<tr class="pass">' in page
    assert "kill redis" in page and "restart &lt;redis&gt; &amp; co" in page
    assert "127.0.0.1:50051" in page  # settings
    assert "UNAVAILABLE" in page  # status counts


def test_report_without_slo(tmp_path: Path) -> None:
    page = write_report(uniform_result(), None, tmp_path)["report.html"].read_text(encoding="utf-8")
    assert "No SLO given" in page and "SLO checks" not in page
    assert page.count("data:image/png;base64,") == 3


def test_report_of_passing_run(tmp_path: Path) -> None:
    result = uniform_result()
    page = write_report(result, evaluate(result, FULL_SLO), tmp_path)["report.html"].read_text(encoding="utf-8")
    assert 'class="banner pass">SLO met<' in page


@pytest.mark.parametrize("result", [errors_only(), RunResult({}, duration_s=0.0)], ids=["errors-only", "empty"])
def test_report_of_runs_without_latencies(tmp_path: Path, result: RunResult) -> None:
    checks = evaluate(result, Slo(latency_ms=(("p99", 10.0),)))
    paths = write_report(result, checks, tmp_path)
    assert all(p.stat().st_size > 0 for p in paths.values())
    page = paths["report.html"].read_text(encoding="utf-8")
    assert "SLO breached: 1 of 1 checks failed" in page
    assert "No OK answers" in page


def test_report_redacts_credentials_in_settings(tmp_path: Path) -> None:
    result = uniform_result()
    result.settings |= {"token": "s3cr3t-bearer", "auth_header": "Bearer xyz", "users": 10}
    page = write_report(result, None, tmp_path)["report.html"].read_text(encoding="utf-8")
    assert "s3cr3t-bearer" not in page and "Bearer xyz" not in page
    assert page.count("(redacted)") == 2


def test_latency_plot_keeps_p99_visible_labels_plain_and_long_event_labels_short(tmp_path: Path) -> None:
    """At low rates p99 equals max: p99 is drawn above max. The log axis labels only plain numbers. A very long
    event label is cut short and kept out of the layout, so saving the plots warns about nothing."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from hyperrec.loadtest.report import EVENT_LABEL_CHARS, latency_over_time_figure

    result = RunResult({"mode": "open"}, 3.0)
    for second in range(3):
        for ms in (0.4, 3.0, 40.0):  # three answers a second: p99 == max
            result.scheduled(second)
            result.add(second, ms / 1e3, "OK")
    result.events.append({"t": 1.0, "label": "command:" + "x" * 300, "ok": True})
    figure = latency_over_time_figure(result)
    FigureCanvasAgg(figure).draw()  # type: ignore[no-untyped-call]
    axes = figure.axes[0]
    lines = {line.get_label(): line for line in axes.get_lines() if not str(line.get_label()).startswith("_")}
    assert lines["p99"].get_zorder() > lines["max"].get_zorder()
    labels = [t.get_text() for t in axes.get_yticklabels(minor=False) + axes.get_yticklabels(minor=True)]
    shown = [label for label in labels if label]
    assert shown and all(re.fullmatch(r"[0-9.]+", label) for label in shown), shown
    texts = [t for t in axes.texts if "command:" in t.get_text()]
    assert len(texts) == 1 and len(texts[0].get_text().strip()) == EVENT_LABEL_CHARS
    assert not texts[0].get_in_layout()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(result, None, tmp_path)
