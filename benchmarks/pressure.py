"""`make pressure`: the server under pressure, measured the way issue 15 asks, in one run on this machine.

1. The in-process floor's CPU per call: the pipeline alone (same bundle, profiles, Redis) called back to back,
   CPU time of this process (every thread) per call.
2. For each round, alternating `--workers 1` and the default (A/B/A/B), a fresh `hyperrec serve` with its own
   health-only port:
   - server CPU per answered call at a fixed open-loop rate (100/s), read from /proc for the server's whole
     process tree (supervisor, workers, health process) over the measured window;
   - capacity (the highest rate meeting p99 <= 10 ms and <= 0.1 % errors) and saturation (the highest rate
     answered in full, any latency);
   - an overload burst: half the saturation for 5 s, five times it for 10 s, half of it again for 10 s: refusals
     answered within 10 ms of their send, admitted answers' p99 and share personalised during the burst, and how
     long after the burst each second's p99 is back under 1.2x the calm phase's.

Results go to `<out>/pressure.json` and a markdown table is printed. Ratios are comparable within one run only:
the load generator shares the machine's cores with the server.

    python -m benchmarks.pressure --items 1000000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.bench import (
    SLO,
    THROUGHPUT_SLO,
    ServeSpec,
    add_bundle_arguments,
    ensure_bundle,
    in_process_floor,
    start_redis,
    started_server,
)
from hyperrec.core.bundle import Bundle, resolve_version
from hyperrec.core.ranker import RankerOptions
from hyperrec.index import set_threads
from hyperrec.loadtest.capacity import search
from hyperrec.loadtest.results import RunResult, new_histogram, summary_ms
from hyperrec.loadtest.runner import LoadTestSettings, run
from hyperrec.loadtest.scenario import Scenario
from hyperrec.loadtest.slo import parse_slo
from hyperrec.profiles.snapshot import load_profiles

TICKS = os.sysconf("SC_CLK_TCK")
CPU_RATE = 100.0  # calls a second of the CPU-per-call run
CALM_S, BURST_S, AFTER_S = 5.0, 10.0, 10.0


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by `root` and every live process below it, from /proc."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])  # ppid is the 4th field of stat; [0] here is the state
        cpu[pid] = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu.get(pid, 0.0) for pid in tree)


def cpu_per_call(base: LoadTestSettings, pid: int) -> dict[str, Any]:
    """Server CPU milliseconds per answered call at CPU_RATE, over the run's whole window (warm-up included, as
    the CPU cannot be split by second; the answers counted are the warm-up's too)."""
    before = tree_cpu_s(pid)
    result = run(replace(base, rate=CPU_RATE))
    used = tree_cpu_s(pid) - before
    answered = result.status_counts.get("OK", 0) * (base.duration_s + base.warmup_s) / base.duration_s
    return {"cpu_ms_per_call": used * 1e3 / answered if answered else float("nan"), "ok": result.status_counts}


def second_slots(result: RunResult, start: float, end: float) -> tuple[Any, int, int]:
    """(merged OK histogram, OK answers, fallbacks) of the seconds in [start, end)."""
    merged, ok, fallbacks = new_histogram(), 0, 0
    for t, slot in result.timeline.items():
        if start <= t < end:
            merged.add(slot.histogram)
            ok += slot.ok
            fallbacks += slot.fallbacks
    return merged, ok, fallbacks


def overload(base: LoadTestSettings, saturation: float) -> dict[str, Any]:
    """Half the saturation, five times it, half again (see the module doc); what the burst did and undid."""
    calm, burst = saturation / 2, saturation * 5
    phases = ((calm, CALM_S), (burst, BURST_S), (calm, AFTER_S))
    settings = replace(base, rate=None, phases=phases, duration_s=CALM_S + BURST_S + AFTER_S, workers=2)
    result = run(settings)
    calm_hist, _, _ = second_slots(result, 0, CALM_S)
    burst_hist, burst_ok, burst_fallbacks = second_slots(result, CALM_S, CALM_S + BURST_S)
    steady_p99 = summary_ms(calm_hist, False)["p99"]
    recovered_after = None
    for t in range(int(CALM_S + BURST_S), int(CALM_S + BURST_S + AFTER_S)):
        slot = result.timeline.get(t)
        if slot is not None and slot.ok and summary_ms(slot.histogram, False)["p99"] <= 1.2 * steady_p99:
            recovered_after = t - (CALM_S + BURST_S) + 1  # seconds after the burst ended, at 1 s resolution
            break
    refused = result.status_counts.get("RESOURCE_EXHAUSTED", 0)
    return {
        "phases": phases,
        "status_counts": result.status_counts,
        "refused_within_10ms": result.answered_within("RESOURCE_EXHAUSTED", 0.010) if refused else None,
        "refusal_from_send_ms": result.to_json(False)["sent_to_answer_ms"].get("RESOURCE_EXHAUSTED"),
        "steady_p99_ms": steady_p99,
        "burst_admitted_p99_ms": summary_ms(burst_hist, False)["p99"],
        "burst_personalised_share": 1 - burst_fallbacks / burst_ok if burst_ok else None,
        "recovered_after_s": recovered_after,
        "timeline": result.to_json(False)["timeline"],
    }


def measure(spec: ServeSpec, workers: int, users: tuple[str, ...], args: argparse.Namespace) -> dict[str, Any]:
    with started_server(spec, ["--workers", str(workers)]) as (target, pid):
        base = LoadTestSettings(
            target,
            rate=CPU_RATE,
            duration_s=args.duration,
            warmup_s=3.0,
            scenario=Scenario(k=20, unknown_user_share=0.0),
            users=users,
        )
        cpu = cpu_per_call(base, pid)
        rates = [float(r) for r in args.rates.split(",")]
        capacity, _ = search(base, rates, parse_slo(SLO, "pressure"))
        saturation, _ = search(base, rates, parse_slo(THROUGHPUT_SLO, "pressure throughput"))
        burst = overload(base, saturation or rates[0])
    print(
        f"workers {workers}: cpu {cpu['cpu_ms_per_call']:.2f} ms/call, capacity {capacity}, saturation {saturation}, "
        f"refused within 10 ms {burst['refused_within_10ms']}, burst p99 {burst['burst_admitted_p99_ms']:.1f} ms, "
        f"personalised {burst['burst_personalised_share']}, recovered after {burst['recovered_after_s']} s",
        flush=True,
    )
    return {"workers": workers, **cpu, "capacity": capacity, "saturation": saturation, "overload": burst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bundle_arguments(parser)
    parser.add_argument("--rates", default="100,150,200,250,300,400,500,600,800")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds: --workers 1, then the default")
    parser.add_argument("--default-workers", type=int, default=0, help="the B side (0: one per usable core)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("make pressure needs redis-server (several workers share profiles through Redis)", file=sys.stderr)
        return 2
    model, profiles = ensure_bundle(args.repo, args.items, args.dim, args.users)
    redis_proc, redis_port = start_redis()
    secret = os.urandom(16).hex()
    spec = ServeSpec(args.repo, model, profiles, f"redis://127.0.0.1:{redis_port}/0", secret)
    try:
        set_threads(1)
        bundle = Bundle.load(resolve_version(args.repo, model), RankerOptions())
        cpu_s: list[float] = []
        asyncio.run(in_process_floor(bundle, profiles, args.calls, 20, spec.redis_url, secret.encode(), cpu_s=cpu_s))
        floor_cpu_ms = sum(cpu_s) * 1e3 / len(cpu_s)  # the measured calls only (set-up and warm-up left out)
        print(f"in-process floor: {floor_cpu_ms:.2f} ms CPU per call", flush=True)
        del bundle
        users = tuple(load_profiles(profiles))
        rows = [measure(spec, w, users, args) for _ in range(args.rounds) for w in (1, args.default_workers)]
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
    result = {
        "items": args.items,
        "floor_cpu_ms_per_call": floor_cpu_ms,
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pressure.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def table(result: dict[str, Any]) -> str:
    floor = result["floor_cpu_ms_per_call"]
    lines = [
        f"in-process floor: {floor:.2f} ms CPU per call",
        "",
        "| round | workers | CPU ms/call (x floor) | capacity p99<=10ms | saturation | refused <=10 ms "
        "| burst p99 ms | burst personalised | recovered after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(result["rows"]):
        burst = row["overload"]
        share = burst["refused_within_10ms"]
        personal = burst["burst_personalised_share"]
        lines.append(
            f"| {i // 2 + 1} | {row['workers'] or 'default'} | {row['cpu_ms_per_call']:.2f} "
            f"({row['cpu_ms_per_call'] / floor:.2f}x) | {row['capacity']} | {row['saturation']} "
            f"| {'-' if share is None else f'{share:.1%}'} | {burst['burst_admitted_p99_ms']:.1f} "
            f"| {'-' if personal is None else f'{personal:.1%}'} | {burst['recovered_after_s']} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
