"""Sequential latency probe: N Recommend calls, one at a time, against a real server process.

Also measures the in-process floor: the same pipeline, same bundle and profiles,
called directly without gRPC, in this process. Prints p50/p99 of both and their
ratio, and writes JSON. This is a probe, not the load tester (open loop, SLOs:
see loadtest/).

    python -m benchmarks.latency_probe --repo /tmp/synthrepo --model synth \
        --profiles /tmp/synthrepo/profiles.npz --calls 1000 --out benchmarks/results/latency_probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

from benchmarks.bench import free_port, wait_serving
from hyperrec.core.bundle import Bundle, resolve_version
from hyperrec.core.domain import Context, DeviceType, RecommendRequest, RequestLimits
from hyperrec.core.pipeline import BundleSlot, PipelineOptions, RecommendPipeline
from hyperrec.core.ranker import RankerOptions
from hyperrec.index import set_threads
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.memory import InMemoryProfileStore
from hyperrec.profiles.snapshot import load_profiles
from hyperrec.v1 import recommender_pb2 as pb
from hyperrec.v1 import recommender_pb2_grpc as pb_grpc


def percentiles(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "max_ms": float(arr.max()),
        "mean_ms": float(arr.mean()),
    }


def server_run(target: str, users: list[str], calls: int, k: int, warmup: int) -> tuple[list[float], list[float]]:
    """Client-observed latencies and the server's own pipeline totals (from StageTimings), in ms."""
    rng = np.random.default_rng(1)
    out: list[float] = []
    inside: list[float] = []
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        for i in range(warmup + calls):
            req = pb.RecommendRequest(
                user_id=users[rng.integers(len(users))],
                k=k,
                context=pb.Context(device_type=pb.DeviceType.ValueType(int(rng.integers(1, 5)))),
                include_timings=True,
            )
            t = time.perf_counter()
            reply = stub.Recommend(req, timeout=5)
            elapsed = (time.perf_counter() - t) * 1e3
            assert reply.strategy == pb.STRATEGY_PERSONALIZED and len(reply.items) == k
            if i >= warmup:
                out.append(elapsed)
                inside.append(reply.timings.total_ms)
    return out, inside


async def floor_run(
    bundle: Bundle, profiles_path: Path, users: list[str], calls: int, k: int, warmup: int
) -> list[float]:
    store = InMemoryProfileStore(Pseudonymizer(os.urandom(32)))
    await store.put_many(load_profiles(profiles_path))
    slot = BundleSlot()
    slot.swap(bundle)
    pipeline = RecommendPipeline(store, slot, PipelineOptions(500, RequestLimits()), ThreadPoolExecutor(2))
    rng = np.random.default_rng(1)
    out: list[float] = []
    for i in range(warmup + calls):
        req = RecommendRequest(
            user_id=users[rng.integers(len(users))], k=k, context=Context(device=DeviceType(int(rng.integers(1, 5))))
        )
        t = time.perf_counter()
        await pipeline.recommend(req)
        if i >= warmup:
            out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--profiles", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    users = list(load_profiles(args.profiles))
    port = free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--port", str(port), "--model-repo", str(args.repo)]
    cmd += ["--model-name", args.model, "--seed-profiles", str(args.profiles), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd)
    try:
        wait_serving(target)
        served, pipeline_in_server = server_run(target, users, args.calls, args.k, args.warmup)
    finally:
        proc.terminate()
        proc.wait(timeout=15)

    set_threads(1)
    bundle = Bundle.load(resolve_version(args.repo, args.model), RankerOptions())
    floor = asyncio.run(floor_run(bundle, args.profiles, users, args.calls, args.k, args.warmup))
    result = {
        "calls": args.calls,
        "k": args.k,
        "items": bundle.index.size,
        "index": bundle.index.kind_name,
        "server": percentiles(served),
        "server_pipeline_only": percentiles(pipeline_in_server),
        "in_process_floor": percentiles(floor),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    result["ratio_p50"] = result["server"]["p50_ms"] / result["in_process_floor"]["p50_ms"]
    result["ratio_p99"] = result["server"]["p99_ms"] / result["in_process_floor"]["p99_ms"]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
