"""The `hyperrec` command line: demo, serve, recommend, train.

Argument parsing happens only here, inside `main()`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hyperrec.app.cli_args import add_connection_arguments, connection_from_args
from hyperrec.app.cli_profiles import add_profile_commands
from hyperrec.app.config import ServerConfig, add_arguments, load_config
from hyperrec.client.recommend import DEVICES, SURFACES
from hyperrec.core.errors import ConfigError, HyperrecError
from hyperrec.core.logs import setup_logging
from hyperrec.core.profile import Profile

log = logging.getLogger("hyperrec")


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when it is installed, else the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we test
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    """One serving process, or with `workers` > 1 a supervisor of that many (hyperrec.app.supervisor)."""
    from hyperrec.app.supervisor import supervise, worker_count

    config = load_config(args)
    setup_logging(config.log_level, config.log_format)
    workers = worker_count(config)
    if workers > 1:
        return supervise(config, workers)
    from hyperrec.app.lifecycle import serve

    run_async(serve(config))
    return 0


def _event_time(hour: int | None, utc_offset_minutes: int = 0) -> datetime | None:
    """Half past `hour` today in the user's local time (UTC + `utc_offset_minutes`), as a UTC instant; None: now."""
    if hour is None:
        return None
    offset = timedelta(minutes=utc_offset_minutes)
    local = (datetime.now(UTC) + offset).replace(hour=hour, minute=30, second=0, microsecond=0)
    return local - offset


def cmd_recommend(args: argparse.Namespace) -> int:
    from hyperrec.client.errors import ClientError
    from hyperrec.client.recommend import RecommendCall, call_recommend, format_table

    features = dict(kv.split("=", 1) for kv in args.feature)
    call = RecommendCall(
        connection=connection_from_args(args),
        user_id=args.user,
        k=args.k,
        device=args.device,
        surface=args.surface,
        country=args.country,
        event_time=_event_time(args.hour, args.utc_offset),
        utc_offset_minutes=args.utc_offset,
        exclude=tuple(args.exclude),
        features=features,
        timeout_s=args.timeout,
        include_timings=args.timings,
        include_seen=args.include_seen,
    )
    try:
        answer = call_recommend(call)
    except ClientError as exc:
        print(f"error: {exc.code}: {exc.details}", file=sys.stderr)
        return 1
    print(format_table(answer))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from hyperrec.training.synthetic import SyntheticConfig, generate
    from hyperrec.training.train import TrainConfig, train_and_publish

    setup_logging(args.log_level)
    if args.dataset:
        return train_on_dataset(args)
    if not args.synthetic:
        print("give --synthetic or --dataset SCHEME:PATH", file=sys.stderr)
        return 2
    data = generate(SyntheticConfig(n_users=args.users, n_items=args.items, seed=args.seed))
    config = TrainConfig(seed=args.seed) if args.epochs is None else TrainConfig(epochs=args.epochs, seed=args.seed)
    result = train_and_publish(data, args.model_repo, args.model, config)
    report_published(result.version_dir, result.profiles, args.profiles_out)
    return 0


def factory_config(args: argparse.Namespace) -> Any:
    from hyperrec.training.factory import FactoryConfig
    from hyperrec.training.history_model import RetrievalConfig

    # `evaluate` trains nothing of ours (it re-scores a published version), so it has no --epochs or --seed
    epochs, seed = getattr(args, "epochs", None), getattr(args, "seed", 0)
    retrieval = RetrievalConfig() if epochs is None else RetrievalConfig(epochs=epochs, seed=seed)
    return FactoryConfig(
        retrieval=retrieval,
        split=args.split or "temporal",
        min_user_events=args.min_user_events or 0,
        retrain_on_all=not getattr(args, "no_retrain", False),
    )


def train_on_dataset(args: argparse.Namespace) -> int:
    """Load a real log, train, evaluate against baselines, publish, and write the report."""
    import json

    from hyperrec.training.factory import markdown_table, run_factory

    result = run_factory(args.dataset, args.model_repo, args.model, factory_config(args), args.drop_malformed)
    report = result.report
    args.report_dir.mkdir(parents=True, exist_ok=True)
    stem = args.report_dir / f"{args.model}-v{result.version_dir.name}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown_table(report) + "\n")
    data, split, timings = report["data"], report["split"], report["timings_s"]
    print(
        f"{args.dataset}: {data['users']} users, {data['items']} items, {data['events']} events "
        f"(dropped: {data['load']['dropped'] or 'none'})"
    )
    print(
        f"split {split['kind']}: train {split['train_events']} / validation {split['validation_events']} / "
        f"test {split['test_events']} events; test users {split['test_users']}"
    )
    print("seconds: " + ", ".join(f"{stage} {value:.1f}" for stage, value in timings.items()))
    print(
        f"ranker: best epoch {report['ranker']['best_epoch']} (0 = retrieval order kept); "
        f"ONNX parity {report['parity_max_abs_diff']:.1e}"
    )
    print(markdown_table(report, ks=(10, 20)))
    for metric, verdict in report["verdict"].items():
        outcome = "beats every baseline" if verdict["beats_every_baseline"] else f"loses to {verdict['best_baseline']}"
        print(f"{metric}: two-stage {verdict['two_stage']:.4f} {outcome}")
    print(f"report: {stem}.json, {stem}.md")
    report_published(result.version_dir, result.profiles, args.profiles_out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from hyperrec.training.evaluate_bundle import evaluate_bundle, summary
    from hyperrec.training.factory import markdown_table

    setup_logging(args.log_level)
    overridden = args.split is not None or args.min_user_events is not None
    cfg = factory_config(args) if overridden else None  # None: the split recorded in the manifest
    result = evaluate_bundle(args.dataset, args.model_repo, args.model, args.version, cfg, args.drop_malformed)
    print(markdown_table({"metrics": result.metrics}, ks=(10, 20)))
    print(f"{result.known_items} dataset items are in {result.version_dir}")
    if args.out:
        args.out.write_text(json.dumps(summary(result), indent=2))
    return 0


def report_published(version_dir: Path, profiles: Mapping[str, Profile], profiles_out: Path | None) -> None:
    """Say what was published and, when asked, write the users' profiles next to it."""
    from hyperrec.profiles.snapshot import save_profiles

    print(f"published {version_dir}")
    if profiles_out:
        save_profiles(profiles_out, profiles)
        print(f"wrote {len(profiles)} profiles to {profiles_out}")


def cmd_synth_bundle(args: argparse.Namespace) -> int:
    from hyperrec.training.synth_bundle import make_synth_bundle

    setup_logging(args.log_level)
    result = make_synth_bundle(args.model_repo, args.model, args.items, args.dim, args.users, args.seed)
    report_published(result.version_dir, result.profiles, args.profiles_out)
    return 0


def cmd_profiles_load(args: argparse.Namespace) -> int:
    """Backfill profiles for every user of a log into the configured (Redis) profile store."""
    from hyperrec.app.assembly import build_profile_store
    from hyperrec.core.bundle import Bundle, resolve_version
    from hyperrec.training.backfill import backfill
    from hyperrec.training.loaders import load_dataset

    overrides = {"model_name": args.model} if args.model else {}
    if args.version is not None:
        overrides["model_version"] = args.version
    config = load_config(args, **overrides)
    setup_logging(config.log_level, config.log_format)
    if not config.redis_url:
        raise ConfigError("profiles load writes to Redis: set --redis-url (and --profile-secret) as for the server")
    bundle = Bundle.load(resolve_version(config.model_repo, config.model_name, config.model_version))
    log, load_report = load_dataset(args.events, args.drop_malformed)
    dropped = sum(load_report.dropped.values())
    print(f"{args.events}: {log.n_users} users, {len(log)} events ({dropped} malformed rows dropped)")

    async def run() -> Any:
        store = build_profile_store(config)
        try:
            await store.ping()
            return await backfill(log, bundle, store, args.batch_size)
        finally:
            await store.close()

    report = run_async(run())
    print(
        f"wrote {report.written} profiles ({report.users - report.written} users opted out, skipped) "
        f"for model {bundle.model_name} version {bundle.version} in {report.seconds:.1f} s: "
        f"{report.users_per_second:,.0f} users/s"
    )
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check: 0 when SERVING, 1 otherwise (NOT_SERVING, unknown service or unreachable)."""
    from hyperrec.client.errors import ClientError
    from hyperrec.client.health import SERVING, check

    if args.target is None:  # the container's own server: its health-only port, else its main port
        port = os.environ.get("HYPERREC_HEALTH_PORT") or os.environ.get("HYPERREC_PORT") or "50051"
        args.target = f"127.0.0.1:{port}"
    connection = connection_from_args(args)
    try:
        status = check(connection, args.service, args.timeout)
    except ClientError as exc:
        print(f"{connection.target}: {exc.code}: {exc.details}", file=sys.stderr)
        return 1
    print(f"{connection.target} {args.service or '(server)'}: {status}")
    return 0 if status == SERVING else 1


def cmd_models(args: argparse.Namespace) -> int:
    """Call the ModelAdmin service and print the model's versions."""
    from hyperrec.client import admin
    from hyperrec.client.errors import ClientError

    connection = connection_from_args(args)
    try:
        if args.models_command == "list":
            models = admin.list_models(connection, args.timeout)
        elif args.models_command == "load":
            loaded = admin.load_version(connection, args.model, args.version, args.timeout)
            print(f"version {loaded.version}: {loaded.state} {loaded.reason}".rstrip())
            return 1 if loaded.failed else 0
        elif args.models_command == "activate":
            models = [admin.activate_version(connection, args.model, args.version, args.timeout)]
        elif args.models_command == "unload":
            models = [admin.unload_version(connection, args.model, args.version, args.timeout)]
        elif args.models_command == "release":
            models = [admin.release_pin(connection, args.model, args.timeout)]
        elif args.models_command == "canary":
            models = [admin.set_canary(connection, args.model, args.version, args.percent, args.timeout)]
        else:
            models = [admin.rollback(connection, args.model, args.timeout)]
    except ClientError as exc:
        print(f"hyperrec models: {exc.code}: {exc.details}", file=sys.stderr)
        return 1
    for model in models:
        print(admin.format_model(model))
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    """Run load against a server, write results (JSON, HTML, PNG), print the verdict; 1 on an SLO breach."""
    try:
        from hyperrec.loadtest import report, slo
        from hyperrec.loadtest.actions import parse_action
        from hyperrec.loadtest.runner import LoadTestSettings, parse_phases, run, write_json
        from hyperrec.loadtest.scenario import ScenarioError, load_scenario, load_users
    except ImportError as exc:
        print(f"hyperrec loadtest needs the loadtest extra (pip install 'hyperrec[loadtest]'): {exc}", file=sys.stderr)
        return 2
    try:
        objectives = slo.load_slo(args.slo) if args.slo else None
        rates = [float(r) for r in args.rates.split(",")] if args.rates else None
        if rates is not None and (objectives is None or not rates or min(rates) <= 0):
            raise ValueError("--rates needs positive rates and an --slo to judge each step by")
        connection = connection_from_args(args)
        phases = parse_phases(args.phases) if args.phases else ()
        settings = LoadTestSettings(
            target=connection.target,
            tls=connection.tls,
            rate=args.rate if rates is None else rates[0],
            phases=phases,
            concurrency=args.concurrency,
            arrival=args.arrival,
            duration_s=sum(seconds for _, seconds in phases) if phases else args.duration,
            warmup_s=args.warmup,
            workers=args.workers,
            deadline_s=args.deadline_ms / 1e3,
            seed=args.seed,
            token=connection.token,
            admin_token=args.admin_token or os.environ.get("HYPERREC_ADMIN_TOKEN") or None,
            scenario=load_scenario(args.scenario),
            users=tuple(load_users(args.users, args.user_count)),
            actions=tuple(parse_action(a) for a in args.at),
        )
        settings.check()
    except (ValueError, ScenarioError, OSError) as exc:
        print(f"hyperrec loadtest: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if rates is not None:
        import json

        from hyperrec.loadtest.capacity import capacity_table, search

        assert objectives is not None
        capacity, steps = search(settings, rates, objectives)
        for step in steps:
            write_json(step.result, args.out / f"step-{step.rate:g}.json")
        summary = {"capacity": capacity, "steps": [step.to_json() for step in steps]}
        (args.out / "capacity.json").write_text(json.dumps(summary, indent=1))
        print(capacity_table(capacity, steps))
        return 0 if capacity is not None else 1
    result = run(settings)
    write_json(result, args.out / "result.json")
    checks = slo.evaluate(result, objectives) if objectives is not None else None
    files = report.write_report(result, checks, args.out)
    latency = result.to_json(with_histograms=False)["latency_ms"]
    print(
        f"offered {result.offered_rate:,.1f}/s, achieved {result.achieved_rate:,.1f}/s, "
        f"errors {result.error_rate:.2%} ({', '.join(f'{k} {v}' for k, v in sorted(result.status_counts.items()))})"
    )
    print("latency ms: " + ", ".join(f"{name} {value:.2f}" for name, value in latency.items()))
    for status, times in result.to_json(with_histograms=False)["sent_to_answer_ms"].items():
        if status != "OK":
            within = result.answered_within(status, 0.010)
            spread = f"p50 {times['p50']:.2f} ms, p99 {times['p99']:.2f} ms"
            print(f"{status} from send: {spread}, {within:.1%} within 10 ms")
    if result.versions:
        print("answers by model version: " + ", ".join(f"{v}: {n}" for v, n in sorted(result.versions.items())))
    if result.strategies:
        print("answers by strategy: " + ", ".join(f"{s}: {n}" for s, n in sorted(result.strategies.items())))
    for event in sorted(result.events, key=lambda e: float(e["t"])):
        print(f"at {float(event['t']):.1f} s: {event['label']} ({'ok' if event.get('ok') else 'FAILED'})")
    print(f"results: {args.out / 'result.json'}, report: {files['report.html']}")
    if checks is None:
        return 0
    print(slo.verdict_table(checks))
    return 0 if slo.passed(checks) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from hyperrec.app.demo import run_demo

    config = load_config(args)
    setup_logging(config.log_level, config.log_format)
    return int(run_async(run_demo(config, retrain=args.retrain, users=args.users, items=args.items)))


def cmd_config(args: argparse.Namespace) -> int:
    from hyperrec.app.config import describe_fields

    print("| field | flag | environment | default | meaning |")
    print("|---|---|---|---|---|")
    for name, default, help_text in describe_fields():
        flag = "--" + name.replace("_", "-")
        print(f"| `{name}` | `{flag}` | `HYPERREC_{name.upper()}` | `{default}` | {help_text} |")
    return 0


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", choices=("temporal", "leave-last"), help="how to split (default: temporal)")
    parser.add_argument("--min-user-events", type=int, help="drop users with fewer events first (default: 0)")
    parser.add_argument(
        "--drop-malformed", action="store_true", help="skip malformed rows (counted) instead of failing"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperrec", description="Low-latency recommendation server.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model from the repository over gRPC")
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="generate data, train, publish, load profiles and serve on localhost:50051")
    add_arguments(demo)
    demo.add_argument("--retrain", action="store_true", help="train a new version even if one exists")
    demo.add_argument("--users", type=int, help="synthetic users to train on (default 3000)")
    demo.add_argument("--items", type=int, help="synthetic items in the catalogue (default 5000)")
    demo.set_defaults(func=cmd_demo)

    rec = sub.add_parser("recommend", help="call Recommend on a running server and print the ranked list")
    add_connection_arguments(rec)
    rec.add_argument("--user", required=True, help="user id")
    rec.add_argument("--k", type=int, default=10, help="number of items")
    rec.add_argument("--device", choices=DEVICES, default="unspecified")
    rec.add_argument("--surface", choices=SURFACES, default="unspecified")
    rec.add_argument("--country", default="", help="ISO 3166-1 alpha-2 code")
    rec.add_argument("--hour", type=int, choices=range(24), metavar="0-23", help="local hour of today (default: now)")
    rec.add_argument("--utc-offset", type=int, default=0, help="user's UTC offset in minutes")
    rec.add_argument("--exclude", action="append", default=[], help="item id to exclude (repeatable)")
    rec.add_argument("--feature", action="append", default=[], help="free-form feature key=value (repeatable)")
    rec.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds")
    rec.add_argument("--timings", action="store_true", help="ask for per-stage server timings")
    rec.add_argument(
        "--include-seen", action="store_true", help="let items of the user's recent history come back (default: not)"
    )
    rec.set_defaults(func=cmd_recommend)
    add_profile_commands(sub)

    train = sub.add_parser("train", help="train a model and publish it as a new version")
    train.add_argument("--synthetic", action="store_true", help="train on generated data")
    train.add_argument("--dataset", help="train on a log: movielens:PATH, movietweetings:PATH or events:PATH")
    add_dataset_arguments(train)
    train.add_argument("--report-dir", type=Path, default=Path("reports"), help="where the evaluation report goes")
    train.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    train.add_argument("--model", default="demo", help="model name")
    train.add_argument("--users", type=int, default=3000)
    train.add_argument("--items", type=int, default=5000)
    train.add_argument("--epochs", type=int, help="training epochs (default: TrainConfig's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--profiles-out", type=Path, help="also write the users' profiles (.npz) here")
    train.add_argument(
        "--no-retrain",
        action="store_true",
        help="publish the model trained on the train part (default: retrain on train + validation first)",
    )
    train.add_argument("--log-level", default="INFO")
    train.set_defaults(func=cmd_train)
    evaluate = sub.add_parser("evaluate", help="re-score a published version on a dataset against baselines")
    evaluate.add_argument("--dataset", required=True, help="movielens:PATH, movietweetings:PATH or events:PATH")
    evaluate.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    evaluate.add_argument("--model", default="demo", help="model name")
    evaluate.add_argument("--version", type=int, help="version (default: newest)")
    evaluate.add_argument("--out", type=Path, help="write the metrics as JSON here")
    evaluate.add_argument("--log-level", default="INFO")
    add_dataset_arguments(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    synth = sub.add_parser("synth-bundle", help="publish a large untrained bundle for benchmarks")
    synth.add_argument("--model-repo", type=Path, default=Path("model_repo"))
    synth.add_argument("--model", default="synth", help="model name")
    synth.add_argument("--items", type=int, default=100_000)
    synth.add_argument("--dim", type=int, default=64)
    synth.add_argument("--users", type=int, default=1000, help="profiles to write with --profiles-out")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--profiles-out", type=Path, help="write matching user profiles (.npz) here")
    synth.add_argument("--log-level", default="INFO")
    synth.set_defaults(func=cmd_synth_bundle)

    profiles = sub.add_parser("profiles", help="manage stored user profiles")
    profiles_sub = profiles.add_subparsers(dest="profiles_command", required=True)
    load = profiles_sub.add_parser(
        "load",
        help="backfill profiles for every user of an interaction log into Redis",
        description="Reads the server's configuration (flags, env, --config) for Redis, secret and profile settings.",
    )
    load.add_argument("--events", required=True, help="the log: movielens:PATH, movietweetings:PATH or events:PATH")
    load.add_argument("--model", help="model whose embeddings and categories the profiles use (default: model_name)")
    load.add_argument("--version", type=int, help="version of the model (default: newest)")
    load.add_argument("--batch-size", type=int, default=500, help="users written per round trip")
    load.add_argument("--drop-malformed", action="store_true", help="skip malformed rows (counted) instead of failing")
    add_arguments(load)
    load.set_defaults(func=cmd_profiles_load)

    health = sub.add_parser("health", help="ask a server's grpc.health.v1 service whether it is SERVING (exit 0)")
    add_connection_arguments(
        health,
        target_help="server address host:port (default: 127.0.0.1 at $HYPERREC_HEALTH_PORT, else $HYPERREC_PORT, "
        "else 50051: what a container health check needs)",
    )
    health.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds")
    health.set_defaults(func=cmd_health)

    models = sub.add_parser(
        "models", help="list, load, activate, roll back or canary model versions on a running server (and its peers)"
    )
    models_sub = models.add_subparsers(dest="models_command", required=True)
    for name, help_text in (
        ("list", "every version the server knows, with its state"),
        ("load", "load, validate and warm a version without serving it"),
        ("activate", "serve a version and pin it in policy.json (every replica follows)"),
        ("rollback", "serve the previously active version and pin it in policy.json"),
        ("unload", "free a loaded version that is not serving (its memory; the files stay in the repository)"),
        ("release", "remove the pin from policy.json: every replica serves the newest usable version"),
        ("canary", "route a share of users to a canary version on every replica (--version 0 stops it)"),
    ):
        cmd = models_sub.add_parser(name, help=help_text)
        add_connection_arguments(cmd, token_env="HYPERREC_ADMIN_TOKEN")
        cmd.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (loading takes time)")
        if name != "list":
            cmd.add_argument("--model", default="demo", help="model name")
        if name in ("load", "activate", "unload", "canary"):
            cmd.add_argument("--version", type=int, required=True, help="version number")
        if name == "canary":
            cmd.add_argument("--percent", type=float, default=10.0, help="percentage of users (0-100) it answers")
        cmd.set_defaults(func=cmd_models)

    lt = sub.add_parser("loadtest", help="send open- or closed-loop load to a server and judge it against an SLO")
    add_connection_arguments(lt)
    load_kind = lt.add_mutually_exclusive_group(required=True)
    load_kind.add_argument("--rate", type=float, help="open loop: requests per second (all workers together)")
    load_kind.add_argument("--concurrency", type=int, help="closed loop: callers each waiting for their answer")
    load_kind.add_argument(
        "--phases",
        help="open loop in phases: RATE:SECONDS,... one after another (e.g. an overload burst 250:10,1250:10,125:10); "
        "the measured duration is their sum, the warm-up runs at the first rate",
    )
    load_kind.add_argument(
        "--rates", help="capacity search: comma-separated open-loop rates, run in rising order until one breaches --slo"
    )
    lt.add_argument("--arrival", choices=("constant", "poisson"), default="constant", help="open-loop arrivals")
    lt.add_argument("--duration", type=float, default=30.0, help="measured seconds (after the warm-up)")
    lt.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    lt.add_argument("--workers", type=int, default=1, help="client processes")
    lt.add_argument("--deadline-ms", type=float, default=1000.0, help="deadline of every call")
    lt.add_argument("--scenario", type=Path, help="YAML: k, exclusions, contexts, unknown-user share, Zipf skew")
    lt.add_argument("--users", type=Path, help="known user ids: a profile snapshot (.npz) or one id per line")
    lt.add_argument("--user-count", type=int, default=1000, help="without --users: ids u00000.. of this many")
    lt.add_argument("--slo", type=Path, help="YAML SLO: latency percentiles, error rate, achieved rate")
    lt.add_argument("--out", type=Path, default=Path("loadtest-results"), help="directory for JSON, HTML and PNGs")
    lt.add_argument("--admin-token", help="token for the admin actions of --at (default: $HYPERREC_ADMIN_TOKEN)")
    lt.add_argument(
        "--at",
        action="append",
        default=[],
        metavar="SECONDS:KIND:ARGS",
        help="mid-run action marked on the timeline: S:activate:MODEL:VERSION, S:rollback:MODEL or S:command:CMD",
    )
    lt.add_argument("--seed", type=int, default=0)
    lt.set_defaults(func=cmd_loadtest)

    config = sub.add_parser("config", help="print every configuration field as a markdown table")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a reader that left shows up here, not in the interpreter's last flush
        return code
    except (ConfigError, HyperrecError) as exc:
        print(f"hyperrec: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `hyperrec recommend ... | head`: the reader left; say nothing more, as `cat` would
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a pipeline's writer that lost its reader


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of the broken pipe raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


__all__ = ["ServerConfig", "build_parser", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
