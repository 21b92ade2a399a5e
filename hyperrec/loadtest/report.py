"""A load-test run as plots and one self-contained HTML page, for SREs to read and to attach to a ticket.

`write_report` writes three PNG plots (latency over time, the latency percentile spectrum, request rates over
time) and `report.html`, which embeds the plots as data URIs and carries its CSS inline, so the page can be
mailed or archived on its own and opens without network access.

Plots use matplotlib's object-oriented `Figure` API, which renders with Agg and never touches pyplot's global
figure registry or an interactive backend (safe on headless hosts and in worker processes); a figure is released
as soon as it is saved.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, FuncFormatter, NullFormatter, NullLocator

from hyperrec.loadtest.results import RunResult, summary_ms
from hyperrec.loadtest.slo import Check, format_value, latency_percentile, passed, verdict_line

LATENCY_OVER_TIME = "latency_over_time.png"
LATENCY_HISTOGRAM = "latency_histogram.png"
ACHIEVED_RATE = "achieved_rate.png"
REPORT = "report.html"
CAPTIONS = {  # file name -> title and caption, in the page's order
    LATENCY_OVER_TIME: "Latency of OK answers per second",
    LATENCY_HISTOGRAM: "Latency distribution of OK answers (percentile spectrum)",
    ACHIEVED_RATE: "Requests per second: sent, OK, errors, fallback answers",
}
TIME_AXIS = "seconds since warm-up (by scheduled send time)"
SECRET_WORDS = ("token", "secret", "password", "credential", "auth")  # settings the page never shows
NINES = (0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999)
FIGSIZE = (10.0, 4.5)
EVENT_LABEL_CHARS = 40  # longer event labels are cut short on the plots
DPI = 100


def write_report(result: RunResult, checks: list[Check] | None, out_dir: Path) -> dict[str, Path]:
    """Write the plots and `report.html` into `out_dir` (created if missing); return their paths by file name:
    "latency_over_time.png", "latency_histogram.png", "achieved_rate.png" and "report.html".

    Without `checks` the page has no SLO section.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        LATENCY_OVER_TIME: latency_over_time_figure(result),
        LATENCY_HISTOGRAM: latency_spectrum_figure(result, checks or []),
        ACHIEVED_RATE: rate_figure(result),
    }
    paths: dict[str, Path] = {}
    for name, figure in figures.items():
        paths[name] = out_dir / name
        figure.savefig(paths[name], format="png", dpi=DPI)
        figure.clear()
    paths[REPORT] = out_dir / REPORT
    paths[REPORT].write_text(render_html(result, checks, paths), encoding="utf-8")
    return paths


# --- plots -------------------------------------------------------------------------------------------------------


def _new_axes(title: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=FIGSIZE, layout="constrained")
    axes = figure.subplots()
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    return figure, axes


def _seconds(result: RunResult) -> list[int]:
    """Every second from the first to the last of the timeline, gaps included (they plot as gaps or zeros)."""
    if not result.timeline:
        return []
    return list(range(min(result.timeline), max(result.timeline) + 1))


def _plain_log_y(axes: Axes) -> None:
    """A log y scale whose labels are plain numbers (1, 10, 100), never a mix of plain and scientific forms; no
    labels between decades."""
    axes.set_yscale("log")
    axis = axes.yaxis
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _short(label: str, limit: int = EVENT_LABEL_CHARS) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _mark_events(axes: Axes, events: Sequence[dict[str, Any]]) -> None:
    """Events as dashed vertical lines labelled at the top of the plot (long labels cut short: the report's
    events table has them whole); labels stay out of the layout, so they can never squeeze the plot away."""
    for event in sorted(events, key=lambda e: float(e["t"])):
        t = float(event["t"])
        axes.axvline(t, color="tab:purple", linestyle="--", linewidth=1, alpha=0.8)
        text = axes.text(
            t,
            0.98,
            f" {_short(str(event.get('label', '')))}",
            transform=axes.get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
            color="tab:purple",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
            clip_on=True,
        )
        text.set_in_layout(False)


def _no_data(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, transform=axes.transAxes, ha="center", va="center", color="grey")


def latency_over_time_figure(result: RunResult) -> Figure:
    """p50, p99 and max latency of each second's OK answers (log scale: a stall must not flatten the median)."""
    figure, axes = _new_axes(CAPTIONS[LATENCY_OVER_TIME])
    seconds = _seconds(result)
    series: dict[str, list[float]] = {"p50": [], "p99": [], "max": []}
    for t in seconds:
        slot = result.timeline.get(t)
        summary = _p50_p99_max_ms(slot.histogram) if slot is not None else None
        for name, values in series.items():
            values.append(summary[name] if summary is not None else math.nan)
    if any(not math.isnan(v) for v in series["max"]):
        x = [t + 0.5 for t in seconds]  # a second's numbers belong to its middle
        # max is drawn first, thin and dashed, so a p99 equal to it (few answers a second) stays visible on top
        styles: dict[str, dict[str, Any]] = {
            "max": {"color": "tab:red", "linestyle": "--", "linewidth": 0.9, "zorder": 2},
            "p50": {"color": "tab:blue", "linewidth": 1.2, "marker": ".", "markersize": 3, "zorder": 3},
            "p99": {"color": "tab:orange", "linewidth": 1.6, "marker": "o", "markersize": 3, "zorder": 4},
        }
        for name in ("max", "p50", "p99"):
            axes.plot(x, series[name], label=name, **styles[name])
        _plain_log_y(axes)
        axes.legend(loc="upper left")
    else:
        _no_data(axes, "no OK answers")
    axes.set_xlabel(TIME_AXIS)
    axes.set_ylabel("latency (ms)")
    _mark_events(axes, result.events)
    return figure


def _p50_p99_max_ms(histogram: Any) -> dict[str, float] | None:
    """What the over-time plot draws of one second; None when it has no OK answers. Not `summary_ms`: its mean
    walks every bucket of the histogram in Python, which costs a long run's report a minute for nothing drawn."""
    if histogram.get_total_count() == 0:
        return None
    values = histogram.get_percentile_to_value_dict([50.0, 99.0])
    return {"p50": values[50.0] / 1e3, "p99": values[99.0] / 1e3, "max": histogram.get_max_value() / 1e3}


def latency_spectrum_figure(result: RunResult, checks: Sequence[Check]) -> Figure:
    """Latency against percentile on a "nines" axis (x = 1/(1-p)), from the HDR histogram of the whole run.

    The tail is where latency SLOs live, and a linear percentile axis squeezes p99..p99.99 into a sliver; the
    nines axis gives each extra nine the same width, and a log latency axis keeps the median readable next to a
    stalled tail. The SLO's latency thresholds are drawn on it.
    """
    figure, axes = _new_axes(CAPTIONS[LATENCY_HISTOGRAM])
    histogram = result.histogram
    count = histogram.get_total_count()
    if count == 0:
        _no_data(axes, "no OK answers")
    else:
        xs: list[float] = []
        ys: list[float] = []
        for step in histogram.get_percentile_iterator(5):
            level = float(step.percentile_level_iterated_to)
            if level < 100.0:  # 100 % is at infinity on this axis; the max line stands for it
                xs.append(_nines_x(level))
                ys.append(step.value_iterated_to / 1e3)
        axes.plot(xs, ys, color="tab:blue", linewidth=1.5, label=f"OK answers ({count:,})")
        max_ms = histogram.get_max_value() / 1e3
        axes.axhline(max_ms, color="tab:blue", linestyle=":", linewidth=1, label=f"max {max_ms:.6g} ms")
        right = max([*xs, *_draw_thresholds(axes, checks), _nines_x(99.0)])
        ticks = [p for p in NINES if _nines_x(p) <= right * 1.01]
        axes.set_xscale("log")
        axes.set_xlim(1.0, right * 1.5)
        axes.xaxis.set_major_locator(FixedLocator([_nines_x(p) for p in ticks]))
        axes.xaxis.set_minor_locator(NullLocator())
        axes.xaxis.set_major_formatter(FixedFormatter([f"{p:g}%" for p in ticks]))
        _plain_log_y(axes)
        axes.legend(loc="upper left")
    axes.set_xlabel("percentile")
    axes.set_ylabel("latency (ms)")
    return figure


def _nines_x(percentile: float) -> float:
    """Position of a percentile (< 100) on the nines axis: 1 at 0 %, 10 at 90 %, 100 at 99 %, ..."""
    return 1.0 / (1.0 - percentile / 100.0)


def _draw_thresholds(axes: Axes, checks: Sequence[Check]) -> list[float]:
    """The SLO's latency thresholds, green when met and red when not: a percentile's as a marker at that
    percentile, the max's as a dashed line. Returns the x positions of the markers."""
    xs = []
    for check in checks:
        key = latency_percentile(check)
        if key == "max":
            axes.axhline(
                check.threshold,
                color=_verdict_colour(check),
                linestyle="--",
                linewidth=1,
                label=f"SLO max <= {check.threshold:g} ms",
            )
        elif key is not None:
            x = _nines_x(float(key.removeprefix("p")))
            xs.append(x)
            axes.plot(
                [x],
                [check.threshold],
                marker="v",
                markersize=9,
                linestyle="none",
                color=_verdict_colour(check),
                label=f"SLO {key} <= {check.threshold:g} ms",
            )
    return xs


def _verdict_colour(check: Check) -> str:
    return "tab:green" if check.passed else "tab:red"


def rate_figure(result: RunResult) -> Figure:
    """Requests sent, answered OK, answered with an error, and OK answers that say a stage fell back (degraded or
    unranked), per second (by scheduled send time)."""
    figure, axes = _new_axes(CAPTIONS[ACHIEVED_RATE])
    seconds = _seconds(result)
    if seconds:
        x = [t + 0.5 for t in seconds]
        rows = [result.timeline.get(t) for t in seconds]
        lines = {  # sent is drawn wide and pale, so it still shows where OK lies on top of it
            "sent": ([r.sent if r else 0 for r in rows], "tab:blue", 3.0, 0.45),
            "OK": ([r.ok if r else 0 for r in rows], "tab:green", 1.2, 1.0),
            "errors": ([r.errors if r else 0 for r in rows], "tab:red", 1.2, 1.0),
            "fallback answers": ([r.fallbacks if r else 0 for r in rows], "tab:orange", 1.2, 1.0),
        }
        for label, (values, colour, width, alpha) in lines.items():
            axes.plot(x, values, label=label, color=colour, linewidth=width, alpha=alpha, marker=".", markersize=3)
        if result.offered_rate > 0:
            axes.axhline(result.offered_rate, color="grey", linestyle=":", linewidth=1, label="offered (mean)")
        axes.set_ylim(bottom=0)
        axes.legend(loc="best")
    else:
        _no_data(axes, "no requests")
    axes.set_xlabel(TIME_AXIS)
    axes.set_ylabel("requests per second")
    _mark_events(axes, result.events)
    return figure


# --- HTML --------------------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
.banner { padding: 0.8em 1.2em; font-size: 1.3em; font-weight: bold; border-radius: 6px; }
.banner.pass { background: #d9f2dd; color: #14571f; border: 1px solid #8fcf99; }
.banner.fail { background: #fbdcdc; color: #7a1212; border: 1px solid #e59a9a; }
.banner.none { background: #eee; color: #444; border: 1px solid #ccc; }
tr.pass td { background: #eefaf0; } tr.fail td { background: #fdeeee; }
tr.pass td:last-child { color: #14571f; font-weight: bold; }
tr.fail td:last-child { color: #7a1212; font-weight: bold; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def render_html(result: RunResult, checks: Sequence[Check] | None, paths: dict[str, Path]) -> str:
    """The report page, with the PNGs at `paths` (by file name) embedded as base64 data URIs."""
    sections = [
        _banner(checks),
        _section("Rates", _rates_table(result)),
        _section("Latency of OK answers", _latency_table(result)),
        _section("Status counts", _status_table(result)),
    ]
    if checks is not None:
        sections.append(_section("SLO checks", _checks_table(checks)))
    sections.append(_section("Plots", "".join(_figure(name, paths[name]) for name in CAPTIONS)))
    sections.append(_section("Events", _events_table(result.events)))
    sections.append(_section("Settings", _settings_table(result.settings)))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>hyperrec load test report</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>hyperrec load test report</h1>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _section(title: str, body: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{body}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] | None = None) -> str:
    """A table of already-escaped cells; cells starting with a digit, sign or "n/a" align right."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes else ""
        cells = "".join(f'<td class="num">{c}</td>' if _numeric(c) else f"<td>{c}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "-+" or cell == "n/a" or cell.startswith(("&lt;", "&gt;")))


def _banner(checks: Sequence[Check] | None) -> str:
    if checks is None:
        return '<div class="banner none">No SLO given: measurements only</div>'
    kind = "pass" if passed(checks) else "fail"
    return f'<div class="banner {kind}">{_e(verdict_line(checks))}</div>'


def _rates_table(result: RunResult) -> str:
    ok = result.status_counts.get("OK", 0)
    ratio = format_value(result.achieved_rate / result.offered_rate) if result.offered_rate > 0 else "n/a"
    rows = [
        ("measured duration (s)", f"{result.duration_s:.6g}"),
        ("offered requests", f"{result.offered:,}"),
        ("answered requests", f"{result.completed:,}"),
        ("unanswered requests", f"{max(result.offered - result.completed, 0):,}"),
        ("OK answers", f"{ok:,}"),
        ("offered rate (req/s)", f"{result.offered_rate:.6g}"),
        ("achieved rate (OK/s)", f"{result.achieved_rate:.6g}"),
        ("achieved / offered", ratio),
        ("error rate (non-OK / answered)", f"{result.error_rate:.6g}"),
    ]
    return _table(("measure", "value"), [(_e(a), _e(b)) for a, b in rows])


def _latency_table(result: RunResult) -> str:
    if result.histogram.get_total_count() == 0:
        return "<p>No OK answers: no latency was recorded.</p>"
    summary = summary_ms(result.histogram)
    header = [*summary.keys(), "count"]
    row = [f"{v:.6g}" for v in summary.values()] + [f"{result.histogram.get_total_count():,}"]
    return _table([f"{h} (ms)" if h != "count" else h for h in header], [row]) + (
        "<p>Milliseconds, measured from each request's scheduled send time in open-loop runs and from its actual "
        "send time in closed-loop runs; HDR histogram, 3 significant digits.</p>"
    )


def _status_table(result: RunResult) -> str:
    if not result.status_counts:
        return "<p>No answers.</p>"
    table = _counts_table("status", result.status_counts)
    if result.strategies:
        table += (
            "<p>OK answers by strategy (degraded: the profile store failed; unranked: ranking did not fit its "
            "budget):</p>" + _counts_table("strategy", result.strategies)
        )
    return table


def _counts_table(what: str, counts: dict[str, int]) -> str:
    total = sum(counts.values())
    rows = [
        (_e(key), f"{count:,}", f"{100.0 * count / total:.3g}%")
        for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]
    return _table((what, "count", "share"), rows)


def _checks_table(checks: Sequence[Check]) -> str:
    if not checks:
        return "<p>The SLO sets no checks.</p>"
    rows = [
        (
            _e(c.name),
            _e(f"{c.comparison} {format_value(c.threshold)}"),
            _e(format_value(c.actual)),
            "PASS" if c.passed else "FAIL",
        )
        for c in checks
    ]
    return _table(("check", "threshold", "actual", "result"), rows, ["pass" if c.passed else "fail" for c in checks])


def _figure(name: str, path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = CAPTIONS[name]
    return (
        f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>\n"
    )


def _events_table(events: Sequence[dict[str, Any]]) -> str:
    if not events:
        return "<p>No events.</p>"
    rows = [(f"{float(e['t']):.6g}", _e(e.get("label", ""))) for e in sorted(events, key=lambda e: float(e["t"]))]
    return _table(("t (s)", "label"), rows)


def _settings_table(settings: dict[str, Any]) -> str:
    """The run's settings; credentials among them are redacted, as the page is meant to be passed around."""
    if not settings:
        return "<p>No settings recorded.</p>"
    rows = [
        (f"<code>{_e(key)}</code>", "(redacted)" if _secret(key, value) else _e(_setting(value)))
        for key, value in sorted(settings.items())
    ]
    return _table(("setting", "value"), rows)


def _secret(key: str, value: object) -> bool:
    return value not in (None, "") and any(word in key.lower() for word in SECRET_WORDS)


def _setting(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)
