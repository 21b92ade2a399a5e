"""Alternating A/B of two server settings on the bench bundle: capacity at p99 <= 10 ms, one server at a time.

`make bench` measures its two servers in a fixed order, so an effect of the order (the machine warming up, a
neighbour's load) cannot be told from an effect of the setting. This script starts the servers alternately
(A, B, A, B, ...), each with its own low-rate run and capacity search against the bench's SLO, and prints one JSON
line per server. It reuses the bench's cached bundle, so run `make bench` once first.

    .venv/bin/python -m benchmarks.batching_ab --a "--batch-max-size 16" --b "--batch-max-size 1" --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
from pathlib import Path

from benchmarks.bench import LOW_RATE, SLO, ServeSpec, ensure_bundle, start_redis, started_server
from hyperrec.loadtest.capacity import search
from hyperrec.loadtest.runner import LoadTestSettings, run
from hyperrec.loadtest.scenario import Scenario
from hyperrec.loadtest.slo import parse_slo
from hyperrec.profiles.snapshot import load_profiles


def measure(flags: list[str], args: argparse.Namespace, spec: ServeSpec) -> dict[str, object]:
    with started_server(spec, ["--workers", "1", *flags]) as (target, _):  # the settings compared, one process
        scenario = Scenario(k=20, unknown_user_share=0.0)
        users = tuple(load_profiles(spec.profiles))
        base = LoadTestSettings(
            target, rate=LOW_RATE, duration_s=args.duration, warmup_s=args.duration / 3, scenario=scenario, users=users
        )
        low = run(base).to_json(with_histograms=False)["latency_ms"]
        capacity, steps = search(base, [float(r) for r in args.rates.split(",")], parse_slo(SLO, "batching A/B"))
    return {
        "flags": flags,
        "low_p50_ms": low["p50"],
        "low_p99_ms": low["p99"],
        "capacity_per_s": capacity,
        "p99_ms_by_rate": {f"{s.rate:g}": s.result.to_json(with_histograms=False)["latency_ms"]["p99"] for s in steps},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="--batch-max-size 16", help="server flags of A")
    parser.add_argument("--b", default="--batch-max-size 1", help="server flags of B")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=Path(tempfile.gettempdir()) / "hyperrec-bench")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--rates", default="100,150,200,250,300", help="rates of the capacity search")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    args = parser.parse_args()
    model, profiles = ensure_bundle(args.repo, args.items, 64, 1000)
    redis, redis_port = start_redis()
    try:
        for _ in range(args.rounds):
            for flags in (args.a, args.b):
                spec = ServeSpec(args.repo, model, profiles, f"redis://127.0.0.1:{redis_port}/0", os.urandom(16).hex())
                print(json.dumps(measure(shlex.split(flags), args, spec)), flush=True)
    finally:
        redis.terminate()
        redis.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
