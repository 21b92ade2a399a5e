"""`make bench`: the server against its floors, measured in one run on this machine.

1. A synthetic bundle (`hyperrec synth-bundle`: 1M items at 64 dimensions by default) and matching profiles,
   cached under --repo between runs.
2. The in-process floor: the same pipeline, bundle and profiles called directly, without gRPC.
3. The gRPC echo floor: a server that returns the request's bytes, called the same way: what gRPC alone costs.
4. The server (`hyperrec serve` with its own redis-server when one is on PATH) under the load tester: a low-rate
   open-loop run (p50 against the floors), then a capacity search at rising rates against the SLO
   (p99 <= 10 ms, error rate <= 0.1 %), a saturation search, a model swap and a Redis outage; then the same
   server without batching (`--batch-max-size 1`): the capacity before batching, in the same run.

Results go to `<out>/bench.json` and a markdown table is printed for docs/benchmarks.md. Numbers are only
comparable within one run: the machine is shared and noisy.

    python -m benchmarks.bench --items 1000000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hyperrec.core.bundle import FORMAT_VERSION, Bundle, list_versions, read_manifest, resolve_version
from hyperrec.core.domain import (
    Context,
    DeviceType,
    Recommendation,
    RecommendRequest,
    RequestLimits,
    ScoredItem,
    Strategy,
)
from hyperrec.core.errors import BundleError
from hyperrec.core.pipeline import BundleSlot, PipelineOptions, RecommendPipeline
from hyperrec.core.profile_store import ProfileStore
from hyperrec.core.ranker import RankerOptions
from hyperrec.index import set_threads
from hyperrec.loadtest.actions import parse_action
from hyperrec.loadtest.capacity import capacity_table, search
from hyperrec.loadtest.runner import LoadTestSettings, run
from hyperrec.loadtest.scenario import Scenario
from hyperrec.loadtest.slo import parse_slo
from hyperrec.profiles.keys import Pseudonymizer
from hyperrec.profiles.memory import InMemoryProfileStore
from hyperrec.profiles.redis_store import RedisProfileStore, RedisStoreOptions
from hyperrec.profiles.snapshot import load_profiles, save_profiles
from hyperrec.server.codec import decode_request, encode_response
from hyperrec.v1 import recommender_pb2 as pb

SLO = {"latency_ms": {"p99": 10.0}, "max_error_rate": 0.001}
# Throughput whatever the latency: the highest rate still answered in full (the saturation point).
THROUGHPUT_SLO = {"max_error_rate": 0.001, "min_achieved_ratio": 0.95}
ECHO_METHOD = "/hyperrec.bench.Echo/Echo"
LOW_RATE = 50.0  # calls a second of the low-load runs


def percentiles(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {f"p{p}": float(np.percentile(arr, p)) for p in (50, 90, 99)} | {"max": float(arr.max())}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(target: str, timeout_s: float = 600) -> None:
    with grpc.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{target} did not become SERVING")


def ensure_bundle(repo: Path, items: int, dim: int, users: int) -> tuple[str, Path]:
    """The cached synthetic bundle for this size, built when missing or of an older bundle format (so the bench
    measures what a new bundle costs to load); returns (model, profiles path)."""
    model = f"bench-{items}x{dim}"
    profiles = repo / f"{model}-profiles.npz"
    versions = list_versions(repo, model)
    try:
        current = bool(versions) and read_manifest(repo / model / str(versions[-1])).format_version == FORMAT_VERSION
    except BundleError:  # a format this code cannot read, or a broken cache: build anew
        current = False
    if not current or not profiles.is_file():
        shutil.rmtree(repo / model, ignore_errors=True)
        from hyperrec.training.synth_bundle import make_synth_bundle

        started = time.perf_counter()
        result = make_synth_bundle(repo, model, items, dim, users)
        save_profiles(profiles, result.profiles)
        print(f"built {result.version_dir} in {time.perf_counter() - started:.0f} s", flush=True)
    return model, profiles


async def in_process_floor(
    bundle: Bundle,
    profiles: Path,
    calls: int,
    k: int,
    redis_url: str | None,
    secret: bytes,
    rate: float = 0.0,
    cpu_s: list[float] | None = None,
) -> list[float]:
    """The pipeline alone: same bundle, profiles and profile store, called one request at a time in this process:
    back to back, or at most `rate` calls a second (then the process idles between calls, as a server at that
    rate does, and pays for waking up). Milliseconds per measured call; with `cpu_s`, each measured call's CPU
    seconds (this process, every thread) are appended to it too."""
    store: ProfileStore = InMemoryProfileStore(Pseudonymizer(secret))
    if redis_url is not None:
        store = RedisProfileStore(RedisStoreOptions(redis_url), Pseudonymizer(secret))
    await store.put_many(load_profiles(profiles))
    users = list(load_profiles(profiles))
    slot = BundleSlot()
    slot.swap(bundle)
    # Compute threads as the server makes them: OpenMP (FAISS) thread counts are per thread, one each.
    executor = ThreadPoolExecutor(2, initializer=set_threads, initargs=(1,))
    pipeline = RecommendPipeline(store, slot, PipelineOptions(500, RequestLimits()), executor)
    rng = np.random.default_rng(1)
    out, took = [], 0.0
    for i in range(calls + calls // 10):
        user = users[int(rng.integers(len(users)))]
        req = RecommendRequest(user, k=k, context=Context(device=DeviceType(int(rng.integers(1, 5)))))
        if rate:  # one call every 1/rate seconds
            await asyncio.sleep(max(0.0, 1 / rate - took))
        started, cpu = time.perf_counter(), time.process_time()
        await pipeline.recommend(req)
        took = time.perf_counter() - started
        if i >= calls // 10:
            out.append(took * 1e3)
            if cpu_s is not None:
                cpu_s.append(time.process_time() - cpu)
    await store.close()
    return out


def protobuf_cost(k: int, repeat: int = 30, number: int = 200) -> dict[str, float]:
    """Microseconds per call (median of `repeat` timings of `number` calls) for the server's protobuf work on one
    Recommend: parsing and decoding the request, and encoding and serialising a k-item answer
    (hyperrec/server/codec.py)."""
    context = pb.Context(device_type=pb.DEVICE_TYPE_MOBILE, surface=pb.SURFACE_HOME, country="DE")
    request = pb.RecommendRequest(
        user_id="bench-user-000001", k=k, context=context, exclude_item_ids=["s0000001", "s0000002", "s0000003"]
    ).SerializeToString()
    items = tuple(ScoredItem(f"s{i:07d}", 1.0 - i / 100, 0.5) for i in range(k))
    answer = Recommendation(items, "bench-1000000x64", "1", Strategy.PERSONALIZED, "0" * 32)

    def per_call(fn: Any) -> float:
        return float(np.median(timeit.repeat(fn, repeat=repeat, number=number))) / number * 1e6

    return {
        "decode_request_us": per_call(lambda: decode_request(pb.RecommendRequest.FromString(request), "0" * 32)),
        "encode_response_us": per_call(lambda: encode_response(answer).SerializeToString()),
    }


def echo_server(port: int) -> None:
    """Serve ECHO_METHOD (bytes in, the same bytes out) until killed: the gRPC floor's server."""

    async def serve() -> None:
        async def echo(request: bytes, _: Any) -> bytes:
            return request

        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "hyperrec.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def echo_floor(calls: int, k: int) -> list[float]:
    """A RecommendRequest-sized round trip through gRPC to a server that does nothing: what gRPC costs here."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", f"from benchmarks.bench import echo_server; echo_server({port})"])
    payload = pb.RecommendRequest(
        user_id="u00001", k=k, context=pb.Context(device_type=pb.DEVICE_TYPE_MOBILE)
    ).SerializeToString()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            call: Any = channel.unary_unary(ECHO_METHOD)
            out = []
            for i in range(calls + calls // 10):
                started = time.perf_counter()
                call(payload, timeout=5)
                if i >= calls // 10:
                    out.append((time.perf_counter() - started) * 1e3)
            return out
    finally:
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class ServeSpec:
    """How the bench starts `hyperrec serve`: repository, model, profiles to seed, Redis and its secret."""

    repo: Path
    model: str
    profiles: Path
    redis_url: str | None
    secret: str


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    """A run-owned redis-server on a free port that keeps nothing on disk: (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    time.sleep(0.5)
    return proc, port


class Started(NamedTuple):
    """A server the bench started: the address to load and the process id (its tree's CPU is read from /proc)."""

    target: str
    pid: int


@contextmanager
def started_server(spec: ServeSpec, flags: Sequence[str]) -> Iterator[Started]:
    """`hyperrec serve` on the bench's model with `flags`, on a free port; yields it once SERVING on its
    health-only port (which answers for every worker together) and stops it on leaving."""
    port, health = free_port(), free_port()
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "hyperrec.app.cli", "serve", "--port", str(port), "--model-repo", str(spec.repo)]
    cmd += ["--health-port", str(health), "--model-name", spec.model, "--seed-profiles", str(spec.profiles)]
    cmd += ["--log-level", "WARNING", *flags]
    if spec.redis_url is not None:
        cmd += ["--redis-url", spec.redis_url]
        env["HYPERREC_PROFILE_SECRET"] = spec.secret
    server = subprocess.Popen(cmd, env=env)
    try:
        wait_serving(f"127.0.0.1:{health}")
        yield Started(f"127.0.0.1:{port}", server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure_server(
    spec: ServeSpec,
    flags: list[str],
    users: tuple[str, ...],
    k: int,
    rates: list[float],
    throughput_rates: list[float],
    duration_s: float,
    outage_port: int | None,
) -> dict[str, Any]:
    """Start a server with `flags`, run the low-rate run and the capacity search (and the Redis outage run when
    `outage_port` is given) against it, stop it."""
    # --watch-interval-s 1: the swap run publishes a version mid-run; one process, as the floors are measured in
    with started_server(spec, ["--workers", "1", "--watch-interval-s", "1", *flags]) as (target, _):
        scenario = Scenario(k=k, unknown_user_share=0.0)
        base = LoadTestSettings(
            target, rate=LOW_RATE, duration_s=duration_s, warmup_s=3.0, scenario=scenario, users=users
        )
        low = run(base)
        capacity, steps = search(base, rates, parse_slo(SLO, "make bench"))
        saturation, load_steps = search(base, throughput_rates, parse_slo(THROUGHPUT_SLO, "make bench throughput"))
        swap = None if outage_port is None else swap_run(base, spec, duration_s)
        outage = None if outage_port is None else redis_outage(base, outage_port, duration_s)
    low_ms = low.to_json(with_histograms=False)["latency_ms"]
    return {
        "low_ms": low_ms,
        "low_status": low.status_counts,
        "capacity": capacity,
        "steps": steps,
        "saturation": saturation,
        "throughput_steps": [step.to_json() for step in load_steps],
        "outage": outage,
        "swap": swap,
    }


def swap_run(base: LoadTestSettings, spec: ServeSpec, duration_s: float) -> dict[str, Any]:
    """The low-rate run again while a new version (a hard-linked copy of the served one) is published mid-run:
    the server's watcher loads, validates and warms it off the request path and swaps it in. Returns the run's
    p99 against a steady run's, measured right before it; the copy is removed afterwards."""
    steady = run(base)
    model_dir = spec.repo / spec.model
    current = max(int(v.name) for v in model_dir.iterdir() if v.name.isdigit())
    staging, new = model_dir / f".staging-{current + 1}", model_dir / str(current + 1)
    publish = f"sh -c 'cp -al {model_dir / str(current)} {staging} && mv {staging} {new}'"
    # twice as long, published a quarter in: time for the watcher to see it and to load and warm 1M items
    swapping = replace(
        base, duration_s=2 * duration_s, actions=(parse_action(f"{duration_s / 2:g}:command:{publish}"),)
    )
    result = run(swapping)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    steady_ms = steady.to_json(with_histograms=False)["latency_ms"]
    swap_ms = result.to_json(with_histograms=False)["latency_ms"]
    print(f"model swap: {result.status_counts}, versions {result.versions}, p99 {swap_ms['p99']:.2f} ms", flush=True)
    return {
        "rate": base.rate,
        "steady_latency_ms": steady_ms,
        "latency_ms": swap_ms,
        "p99_ratio_to_steady": swap_ms["p99"] / steady_ms["p99"] if steady_ms["p99"] else None,
        "status_counts": result.status_counts,
        "versions": result.versions,
        "events": result.events,
    }


def redis_outage(base: LoadTestSettings, redis_port: int, duration_s: float) -> dict[str, Any]:
    """The low-rate run again while the bench's Redis is shut down a third of the way in and started again at two
    thirds (both marked on the timeline): errors, degraded answers and latency during the outage."""
    workdir = tempfile.gettempdir()
    restart = f"redis-server --port {redis_port} --save '' --appendonly no --daemonize yes --dir {workdir}"
    stop_at, start_at = duration_s / 3, 2 * duration_s / 3
    actions = (
        parse_action(f"{stop_at:g}:command:redis-cli -p {redis_port} shutdown nosave"),
        parse_action(f"{start_at:g}:command:{restart}"),
    )
    result = run(replace(base, actions=actions))
    print(f"Redis outage: {result.status_counts}, strategies {result.strategies}", flush=True)
    during = [s for t, s in result.timeline.items() if t + 1 > stop_at and t < start_at]  # seconds overlapping it
    return {
        "rate": base.rate,
        "stopped_at_s": stop_at,
        "restarted_at_s": start_at,
        "status_counts": result.status_counts,
        "strategies": result.strategies,
        "events": result.events,
        "latency_ms": result.to_json(with_histograms=False)["latency_ms"],
        "fallbacks_during_outage": sum(s.fallbacks for s in during),  # in the seconds the outage overlaps
        "answers_during_outage": sum(s.ok for s in during),
    }


def add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every measuring script shares: the synthetic bundle (size, cache), run length, floor calls, out."""
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--repo", type=Path, default=Path(tempfile.gettempdir()) / "hyperrec-bench")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds of each load run")
    parser.add_argument("--calls", type=int, default=500, help="sequential calls per in-process floor")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bundle_arguments(parser)
    parser.add_argument("--rates", default="100,150,200,250,300,400,500,750,1000")
    parser.add_argument(
        "--throughput-rates", default="100,150,200,250,300,400,500,600,800", help="rates of the saturation search"
    )
    args = parser.parse_args()
    k = 20
    model, profiles = ensure_bundle(args.repo, args.items, args.dim, args.users)

    redis_proc, redis_url, redis_port = None, None, None
    secret = os.urandom(16).hex()
    if shutil.which("redis-server"):
        redis_proc, redis_port = start_redis()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
    set_threads(1)
    bundle = Bundle.load(resolve_version(args.repo, model), RankerOptions())
    floor_ms = asyncio.run(in_process_floor(bundle, profiles, args.calls, k, redis_url, secret.encode()))
    floor = percentiles(floor_ms)
    paced_ms = asyncio.run(in_process_floor(bundle, profiles, args.calls, k, redis_url, secret.encode(), LOW_RATE))
    paced = percentiles(paced_ms)
    del bundle
    echo = percentiles(echo_floor(args.calls, k))
    codec = protobuf_cost(k)
    print(f"in-process floor {floor}\n  paced at {LOW_RATE:g}/s {paced}\ngRPC echo floor {echo}\nprotobuf {codec}")

    users = tuple(load_profiles(profiles))
    serve = ServeSpec(args.repo, model, profiles, redis_url, secret)
    rates = [float(r) for r in args.rates.split(",")]
    try:
        through = [float(r) for r in args.throughput_rates.split(",")]
        # The default server (batches of up to 16) and the same without batching, in one run.
        main_run = measure_server(serve, [], users, k, rates, through, args.duration, redis_port)
        unbatched = measure_server(serve, ["--batch-max-size", "1"], users, k, rates, through, args.duration, None)
    finally:
        if redis_proc is not None:  # it may have been restarted (daemonized) by the outage run: stop it by port
            subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "nosave"], capture_output=True, check=False)
            redis_proc.wait(timeout=10)
    low_ms, capacity, outage, swap = main_run["low_ms"], main_run["capacity"], main_run["outage"], main_run["swap"]
    unbatched_capacity = unbatched["capacity"]

    result = {
        "items": args.items,
        "dim": args.dim,
        "k": k,
        "candidates": 500,
        "profile_store": "redis" if redis_proc is not None else "in-process",
        "in_process_floor_ms": floor,
        "in_process_floor_paced_ms": paced,  # the same calls at the low-load rate, idle between calls
        "grpc_echo_floor_ms": echo,
        "protobuf_us": codec,
        "low_load": {"rate": LOW_RATE, "latency_ms": low_ms, "status_counts": main_run["low_status"]},
        "ratio_p50_to_floor": low_ms["p50"] / floor["p50"],
        "ratio_p50_to_paced_floor": low_ms["p50"] / paced["p50"],
        "capacity_per_s": capacity,
        "steps": [step.to_json() for step in main_run["steps"]],
        "saturation_per_s": main_run["saturation"],  # highest rate answered in full (errors <= 0.1 %), any latency
        "throughput_steps": main_run["throughput_steps"],
        "redis_outage": outage,
        "model_swap": swap,
        "unbatched": {  # the same server with --batch-max-size 1
            "low_load": {"rate": LOW_RATE, "latency_ms": unbatched["low_ms"], "status_counts": unbatched["low_status"]},
            "capacity_per_s": unbatched_capacity,
            "steps": [step.to_json() for step in unbatched["steps"]],
            "saturation_per_s": unbatched["saturation"],
            "throughput_steps": unbatched["throughput_steps"],
        },
        "capacity_ratio_to_unbatched": (capacity / unbatched_capacity) if capacity and unbatched_capacity else None,
        "throughput_slo": THROUGHPUT_SLO,
        "slo": SLO,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    print("default server:\n" + capacity_table(capacity, main_run["steps"]))
    print("without batching:\n" + capacity_table(unbatched_capacity, unbatched["steps"]))
    u_ms = unbatched["low_ms"]
    print(
        f"\n| measure | p50 ms | p99 ms |\n|---|---|---|\n"
        f"| in-process floor | {floor['p50']:.2f} | {floor['p99']:.2f} |\n"
        f"| in-process floor paced at {LOW_RATE:g}/s | {paced['p50']:.2f} | {paced['p99']:.2f} |\n"
        f"| gRPC echo floor | {echo['p50']:.2f} | {echo['p99']:.2f} |\n"
        f"| server at 50/s (open loop) | {low_ms['p50']:.2f} | {low_ms['p99']:.2f} |\n"
        f"| server at 50/s, without batching | {u_ms['p50']:.2f} | {u_ms['p99']:.2f} |\n\n"
        f"p50 ratio server / in-process floor: {result['ratio_p50_to_floor']:.2f} "
        f"(to the paced floor: {result['ratio_p50_to_paced_floor']:.2f}); "
        f"capacity at p99 <= 10 ms: {capacity or 'none'} (without batching: {unbatched_capacity or 'none'}); "
        f"saturation: {main_run['saturation'] or 'none'}/s (without batching: {unbatched['saturation'] or 'none'}/s)"
    )
    if swap is not None:
        print(
            f"model swap at {swap['rate']:g}/s: {swap['status_counts']}, answers by version {swap['versions']}, "
            f"p99 {swap['latency_ms']['p99']:.2f} ms against {swap['steady_latency_ms']['p99']:.2f} ms steady "
            f"({swap['p99_ratio_to_steady']:.2f}x)"
        )
    if outage is not None:
        print(
            f"Redis outage at {outage['rate']:g}/s: {outage['status_counts']}, "
            f"{outage['fallbacks_during_outage']} of {outage['answers_during_outage']} answers degraded while it "
            f"was down, p99 {outage['latency_ms']['p99']:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
