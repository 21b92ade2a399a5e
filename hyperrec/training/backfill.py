"""Backfill: build every user's live profile from an interaction log and write them to the profile store.

Each user's events are replayed in time order through `hyperrec.core.behaviour.apply_events`,
the same update the server applies to live events, so a backfilled profile equals the
one the server would have built had it received the log as RecordEvents calls (a test
compares both). The user vector is the fold-in of the recent items in the chosen
bundle's embedding space. Profiles are written in pipelined batches (one round trip
per batch); users who opted out are skipped by the store.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from hyperrec.core.behaviour import replay
from hyperrec.core.bundle import Bundle
from hyperrec.core.pipeline import fold_recent
from hyperrec.core.profile import Profile, ProfileSettings, StoredEvent
from hyperrec.core.profile_store import ProfileStore
from hyperrec.training import progress
from hyperrec.training.behaviour_features import EVENT_TYPE_OF_CODE, event_weights
from hyperrec.training.interactions import Interactions


def stored_events(log: Interactions, rows: np.ndarray, bundle: Bundle, weights: np.ndarray) -> list[StoredEvent]:
    """The log's rows (one user's, in time order) as the stores take events; `weights` from `event_weights`."""
    out = []
    for row in rows:
        item_id = log.catalog.item_ids[log.item[row]]
        kind = EVENT_TYPE_OF_CODE[log.event_type[row]]
        weight = float(weights[row])
        at = float(log.timestamp[row])
        out.append(StoredEvent(f"backfill:{row}", item_id, kind, weight, at, bundle.categories_of(item_id)))
    return out


def build_profiles(log: Interactions, bundle: Bundle, settings: ProfileSettings) -> Iterator[tuple[str, Profile]]:
    """(user id, profile) for every user with events, in user order."""
    order = np.lexsort((log.timestamp, log.user))  # by user, then time; rows within a second keep log order
    bounds = np.searchsorted(log.user[order], np.arange(log.n_users + 1))
    now = time.time()
    space = bundle.manifest.embedding_space
    weights = event_weights(log)
    for user in range(log.n_users):
        rows = order[bounds[user] : bounds[user + 1]]
        if not len(rows):
            continue
        profile = replay(stored_events(log, rows, bundle, weights), settings)
        vector = fold_recent(bundle, profile)
        profile = replace(profile, updated_at=now)
        if vector is not None:
            profile = replace(profile, user_vector=vector, embedding_space=space)
        yield log.user_ids[user], profile


@dataclass(frozen=True)
class BackfillReport:
    users: int
    written: int  # users not opted out
    seconds: float

    @property
    def users_per_second(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else math.inf


async def backfill(log: Interactions, bundle: Bundle, store: ProfileStore, batch_size: int = 500) -> BackfillReport:
    """Write every user's profile into `store`, `batch_size` users per round trip, with a progress bar."""
    started = time.perf_counter()
    users = written = 0
    batch: dict[str, Profile] = {}
    total = len(np.unique(log.user))
    for user_id, profile in progress.progress(
        build_profiles(log, bundle, store.settings), "profiles", total=total, unit=" users"
    ):
        batch[user_id] = profile
        if len(batch) >= batch_size:
            written += await store.put_many(batch)
            users += len(batch)
            batch = {}
    if batch:
        written += await store.put_many(batch)
        users += len(batch)
    return BackfillReport(users, written, time.perf_counter() - started)
