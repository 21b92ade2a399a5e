"""The command line's Profiles commands: `events send`, `interests set`, `consent` and `forget`.

They call a running server (the token needs the `ingest` scope: `--token` or $HYPERREC_TOKEN) and print what it
did; a refused call prints its status code and details and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from hyperrec.app.cli_args import add_connection_arguments, connection_from_args
from hyperrec.client.errors import ClientError
from hyperrec.client.profiles import (
    EVENT_TYPES,
    EventSpec,
    forget_user,
    record_events,
    set_consent,
    set_interests,
)
from hyperrec.client.recommend import DEVICES, SURFACES


def _refused(call: Callable[[], int]) -> int:
    try:
        return call()
    except ClientError as exc:
        print(f"error: {exc.code}: {exc.details}", file=sys.stderr)
        return 1


def _when(text: str | None) -> datetime | None:
    """An ISO 8601 time with its offset (a time without one would be ambiguous); None: now."""
    if text is None:
        return None
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"--at {text!r} needs a UTC offset, e.g. {text}+00:00")
    return when


def cmd_events_send(args: argparse.Namespace) -> int:
    """Send one event; exit 0 when stored (or a duplicate, or dropped for no consent), 1 when rejected."""
    spec = EventSpec(
        event_id=args.event_id or uuid.uuid4().hex,
        user_id=args.user,
        item_id=args.item,
        type=args.type,
        value=args.value,
        when=args.at,
        device=args.device,
        surface=args.surface,
        country=args.country,
    )

    def send() -> int:
        outcome = record_events(connection_from_args(args), [spec], args.timeout)
        print(
            f"event {spec.event_id}: accepted {outcome.accepted} · duplicates {outcome.duplicates} · "
            f"dropped (no consent) {outcome.dropped_no_consent} · request id {outcome.request_id}"
        )
        for rejection in outcome.rejected:
            print(f"rejected: {rejection.field}: {rejection.reason}", file=sys.stderr)
        return 1 if outcome.rejected else 0

    return _refused(send)


def cmd_interests_set(args: argparse.Namespace) -> int:
    def run() -> int:
        stored = set_interests(connection_from_args(args), args.user, args.categories, args.timeout)
        print(f"interests of {args.user}: {', '.join(stored)}" if stored else f"interests of {args.user} cleared")
        return 0

    return _refused(run)


def cmd_consent(args: argparse.Namespace) -> int:
    def run() -> int:
        deleted = set_consent(connection_from_args(args), args.user, args.allow, args.timeout)
        if args.allow:
            print(f"{args.user}: personalization allowed")
        else:
            print(f"{args.user}: opted out of personalization" + (" (profile deleted)" if deleted else ""))
        return 0

    return _refused(run)


def cmd_forget(args: argparse.Namespace) -> int:
    def run() -> int:
        deleted = forget_user(connection_from_args(args), args.user, args.timeout)
        print(f"{args.user}: erased {', '.join(deleted)}" if deleted else f"{args.user}: nothing was stored")
        return 0

    return _refused(run)


def _client(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_connection_arguments(parser)
    parser.add_argument("--user", required=True, help="user id")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds")
    return parser


def add_profile_commands(sub: Any) -> None:
    """Add the Profiles commands to the `hyperrec` subcommand parser `sub`."""
    events = sub.add_parser("events", help="send user events to a running server (Profiles.RecordEvents)")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    send = _client(events_sub.add_parser("send", help="send one event; the next Recommend reflects it"))
    send.add_argument("--item", required=True, help="item id")
    send.add_argument("--type", required=True, choices=EVENT_TYPES, help="what happened")
    send.add_argument("--value", type=float, default=0.0, help="dwell milliseconds (dwell) or the rating (rating)")
    send.add_argument("--event-id", help="id that makes a retry count once (default: a new random id)")
    send.add_argument("--at", type=_when, help="when it happened, ISO 8601 with offset (default: now)")
    send.add_argument("--device", choices=DEVICES, default="unspecified")
    send.add_argument("--surface", choices=SURFACES, default="unspecified")
    send.add_argument("--country", default="", help="ISO 3166-1 alpha-2 code")
    send.set_defaults(func=cmd_events_send)

    interests = sub.add_parser("interests", help="declare a user's interests (Profiles.SetInterests)")
    interests_sub = interests.add_subparsers(dest="interests_command", required=True)
    put = _client(interests_sub.add_parser("set", help="store the categories (none: clear them)"))
    put.add_argument("categories", nargs="*", help="category names of the active model (hyperrec models describe)")
    put.set_defaults(func=cmd_interests_set)

    consent = _client(sub.add_parser("consent", help="record a user's choice about personalization"))
    choice = consent.add_mutually_exclusive_group(required=True)
    choice.add_argument("--allow", action="store_true", help="personalization allowed (the default for everyone)")
    choice.add_argument("--deny", action="store_true", help="opt out: the profile is deleted, later events dropped")
    consent.set_defaults(func=cmd_consent)

    forget = _client(sub.add_parser("forget", help="erase everything the server holds for a user"))
    forget.set_defaults(func=cmd_forget)
