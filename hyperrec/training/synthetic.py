"""Synthetic user-item interactions with planted, testable structure.

The generator stands in for a real interaction log in the demo and the tests.
It is built so that a model trained on it has something real to learn:

- Items belong to categories: each item's latent vector is its category's
  centre plus noise, so embeddings learned from co-consumption cluster by
  category.
- Popularity is skewed: every item has a log-normal popularity that shifts its
  choice logit by `log(popularity)`.
- Users have tastes: a mixture of one to three categories plus noise.
- A context effect is planted, strong enough to be measured in raw counts and
  learned by the ranker (see the constants below): `MOBILE_CATEGORIES` gain
  `MOBILE_BOOST` logits on mobile and lose as much on desktop, and
  `NIGHT_CATEGORIES` gain `NIGHT_BOOST` logits at local night hours (see
  `is_night_hour`) and lose as much during the day.

Each event picks its item from a softmax over
`TASTE_SCALE * user·item + log popularity + context boost`. Everything derives
from the config's seed and a fixed end date, never from the wall clock, so a
config always yields the same data.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt

from hyperrec.core.domain import Context, DeviceType, Surface

# --- The planted context effect -------------------------------------------------------------
#: Categories chosen more often on mobile devices and less often on desktops.
MOBILE_CATEGORIES: tuple[int, ...] = (1, 4, 7)
#: Categories chosen more often at local night hours (see `is_night_hour`) than in daytime.
NIGHT_CATEGORIES: tuple[int, ...] = (2, 5, 8)
#: Logit added to MOBILE_CATEGORIES on mobile and subtracted on desktop (tablet and TV: 0).
MOBILE_BOOST = 1.5
#: Logit added to NIGHT_CATEGORIES at night and subtracted in daytime.
NIGHT_BOOST = 1.5
#: Night is local hour >= NIGHT_START_HOUR or < NIGHT_END_HOUR.
NIGHT_START_HOUR = 20
NIGHT_END_HOUR = 4

# --- Other structure ------------------------------------------------------------------------
#: Multiplier of the user·item affinity in the choice logit (how much taste matters).
TASTE_SCALE = 3.0
#: Standard deviation of item and user latent noise around their category centres.
LATENT_NOISE = 0.35
#: Sigma of the log-normal item popularity.
POPULARITY_SIGMA = 1.0
#: The data always ends here (2025-06-01T00:00:00Z), so runs do not depend on the clock.
END_TIMESTAMP = 1_748_736_000
#: Countries users live in, their UTC offsets in minutes, and their share of users.
COUNTRIES: tuple[tuple[str, int, float], ...] = (
    ("US", -300, 0.30),
    ("GB", 0, 0.15),
    ("DE", 60, 0.15),
    ("BR", -180, 0.10),
    ("IN", 330, 0.15),
    ("JP", 540, 0.15),
)
#: Devices users own; each user draws a mix over these from a Dirichlet with these weights.
DEVICES: tuple[DeviceType, ...] = (DeviceType.MOBILE, DeviceType.DESKTOP, DeviceType.TABLET, DeviceType.TV)
DEVICE_ALPHA: tuple[float, ...] = (1.6, 1.2, 0.4, 0.3)
#: Where recommendations were shown, and how often.
SURFACES: tuple[tuple[Surface, float], ...] = (
    (Surface.HOME, 0.45),
    (Surface.ITEM_DETAIL, 0.25),
    (Surface.SEARCH, 0.15),
    (Surface.CART, 0.05),
    (Surface.NOTIFICATION, 0.10),
)
#: Relative activity per local hour 0..23: quiet small hours, lunch and evening peaks.
HOURLY_ACTIVITY: tuple[float, ...] = (
    0.6, 0.4, 0.25, 0.2, 0.2, 0.3, 0.5, 0.8, 1.0, 1.0, 1.0, 1.1,
    1.3, 1.2, 1.0, 1.0, 1.0, 1.1, 1.3, 1.5, 1.6, 1.5, 1.2, 0.9,
)  # fmt: skip
_USER_CHUNK = 32  # users whose choice distributions are materialised at once


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and seed of a synthetic data set; the defaults are the demo's."""

    n_users: int = 3000
    n_items: int = 5000
    n_categories: int = 20
    latent_dim: int = 16
    events_per_user: float = 40.0
    seed: int = 0
    days: int = 60

    def __post_init__(self) -> None:
        """Reject sizes the planted effect or the temporal split cannot work with."""
        planted = max(MOBILE_CATEGORIES + NIGHT_CATEGORIES)
        if self.n_categories <= planted:
            raise ValueError(f"n_categories must exceed {planted} so the planted categories exist")
        if self.n_items < self.n_categories or self.n_users < 1 or self.latent_dim < 2:
            raise ValueError("need at least one item per category, one user and latent_dim >= 2")
        if self.events_per_user < 3 or self.days < 2:
            raise ValueError("need events_per_user >= 3 and days >= 2")


def is_night_hour(hour: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Whether local hours (0..23) fall in the planted night window."""
    h = np.asarray(hour)
    return np.asarray((h >= NIGHT_START_HOUR) | (h < NIGHT_END_HOUR))


@dataclass(frozen=True)
class SyntheticData:
    """A generated interaction log, events sorted by (user row, timestamp).

    Event columns are parallel arrays, one entry per event: `event_user` and
    `event_item` are rows into `user_ids` and `item_ids`; `event_ts` is unix
    seconds (UTC); `event_device` and `event_surface` hold DeviceType and
    Surface values; `event_country` ISO alpha-2 codes; `event_utc_offset` the
    user's offset in minutes. The latent arrays are the generator's ground
    truth, for diagnostics only.
    """

    config: SyntheticConfig
    item_ids: tuple[str, ...]
    item_category: npt.NDArray[np.int64]
    category_names: tuple[str, ...]
    user_ids: tuple[str, ...]
    event_user: npt.NDArray[np.int64]
    event_item: npt.NDArray[np.int64]
    event_ts: npt.NDArray[np.int64]
    event_device: npt.NDArray[np.int64]
    event_surface: npt.NDArray[np.int64]
    event_country: npt.NDArray[np.str_]
    event_utc_offset: npt.NDArray[np.int64]
    item_latent: npt.NDArray[np.float32]
    user_latent: npt.NDArray[np.float32]
    item_log_popularity: npt.NDArray[np.float32]

    @property
    def n_users(self) -> int:
        """Number of users."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of items."""
        return len(self.item_ids)

    @property
    def n_events(self) -> int:
        """Number of events."""
        return int(self.event_user.shape[0])

    @property
    def end_time(self) -> datetime:
        """The fixed instant the data ends at, used as "now" for training and cold start."""
        return datetime.fromtimestamp(END_TIMESTAMP, tz=UTC)

    def local_hours(self) -> npt.NDArray[np.int64]:
        """Each event's hour of day in the user's local time."""
        return np.asarray(((self.event_ts + self.event_utc_offset * 60) // 3600) % 24, dtype=np.int64)

    def context(self, row: int) -> Context:
        """The serving `Context` of one event."""
        return Context(
            event_time=datetime.fromtimestamp(int(self.event_ts[row]), tz=UTC),
            utc_offset_minutes=int(self.event_utc_offset[row]),
            device=DeviceType(int(self.event_device[row])),
            country=str(self.event_country[row]),
            surface=Surface(int(self.event_surface[row])),
        )

    def contexts(self, rows: Sequence[int] | npt.NDArray[np.int64] | None = None) -> list[Context]:
        """Serving contexts for the given event rows (all events when None)."""
        selected = range(self.n_events) if rows is None else rows
        return [self.context(int(row)) for row in selected]

    def user_bounds(self) -> npt.NDArray[np.int64]:
        """Start offsets of each user's events, plus the total: user u owns rows [b[u], b[u+1])."""
        return np.searchsorted(self.event_user, np.arange(self.n_users + 1)).astype(np.int64)


def generate(config: SyntheticConfig | None = None) -> SyntheticData:
    """Generate a reproducible data set for `config` (the demo defaults when None)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    item_category, item_latent, log_pop, centres = _items(cfg, rng)
    user_latent = _users(cfg, rng, centres)
    event_user = _events_per_user(cfg, rng)
    device, surface, country, offset = _event_contexts(cfg, rng, event_user)
    ts, local_hour = _timestamps(cfg, rng, offset)
    combo = _context_combo(device, local_hour)
    boost = _boost_table(cfg.n_categories)[:, item_category]
    event_item = _sample_items(rng, user_latent, item_latent, log_pop, boost, event_user, combo)
    order = np.lexsort((ts, event_user))
    return SyntheticData(
        config=cfg,
        item_ids=tuple(f"i{i:05d}" for i in range(cfg.n_items)),
        item_category=item_category,
        category_names=tuple(f"category-{c:02d}" for c in range(cfg.n_categories)),
        user_ids=tuple(f"u{u:05d}" for u in range(cfg.n_users)),
        event_user=event_user[order],
        event_item=event_item[order],
        event_ts=ts[order],
        event_device=device[order],
        event_surface=surface[order],
        event_country=country[order],
        event_utc_offset=offset[order],
        item_latent=item_latent,
        user_latent=user_latent,
        item_log_popularity=log_pop,
    )


def _unit_rows(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Rows scaled to unit length."""
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def _items(
    cfg: SyntheticConfig, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """Item categories (every category non-empty), latent vectors, log popularity, and category centres."""
    centres = _unit_rows(rng.standard_normal((cfg.n_categories, cfg.latent_dim)))
    extra = rng.integers(0, cfg.n_categories, cfg.n_items - cfg.n_categories)
    category = rng.permutation(np.concatenate([np.arange(cfg.n_categories), extra])).astype(np.int64)
    noise = rng.standard_normal((cfg.n_items, cfg.latent_dim)) * LATENT_NOISE / np.sqrt(cfg.latent_dim)
    latent = (centres[category] + noise).astype(np.float32)
    log_pop = rng.normal(0.0, POPULARITY_SIGMA, cfg.n_items).astype(np.float32)
    return category, latent, log_pop, centres


def _users(cfg: SyntheticConfig, rng: np.random.Generator, centres: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """User taste vectors: a Dirichlet-weighted mix of one to three category centres plus noise."""
    n_tastes = rng.integers(1, 4, cfg.n_users)
    weights = np.zeros((cfg.n_users, cfg.n_categories))
    for user in range(cfg.n_users):
        chosen = rng.choice(cfg.n_categories, size=n_tastes[user], replace=False)
        weights[user, chosen] = rng.dirichlet(np.full(n_tastes[user], 2.0))
    noise = rng.standard_normal((cfg.n_users, cfg.latent_dim)) * LATENT_NOISE / np.sqrt(cfg.latent_dim)
    return np.asarray(weights @ centres + noise, dtype=np.float32)


def _events_per_user(cfg: SyntheticConfig, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """The user row of every event; counts are Poisson around the mean with at least three each."""
    counts = np.maximum(3, rng.poisson(cfg.events_per_user, cfg.n_users))
    return np.repeat(np.arange(cfg.n_users, dtype=np.int64), counts)


def _pick(
    rng: np.random.Generator, probs: npt.NDArray[np.float64], rows: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """For each entry of `rows`, a category index drawn from that row of the probability table."""
    cdf: npt.NDArray[np.float64] = np.cumsum(probs, axis=1)
    cdf = cdf / cdf[:, -1:]
    draws = rng.random(len(rows))
    picked = (draws[:, None] >= cdf[rows]).sum(axis=1)
    return np.asarray(np.minimum(picked, probs.shape[1] - 1), dtype=np.int64)


def _event_contexts(
    cfg: SyntheticConfig, rng: np.random.Generator, event_user: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.str_], npt.NDArray[np.int64]]:
    """Device (from each user's device mix), surface, country and UTC offset (from the user's home) per event."""
    device_mix = rng.dirichlet(DEVICE_ALPHA, cfg.n_users)
    device_codes = np.array([int(d) for d in DEVICES], dtype=np.int64)
    device = device_codes[_pick(rng, device_mix, event_user)]
    surface_codes = np.array([int(s) for s, _ in SURFACES], dtype=np.int64)
    surface_probs = np.array([[p for _, p in SURFACES]])
    surface = surface_codes[_pick(rng, surface_probs, np.zeros_like(event_user))]
    country_probs = np.array([p for _, _, p in COUNTRIES])
    home = rng.choice(len(COUNTRIES), size=cfg.n_users, p=country_probs / country_probs.sum())
    codes = np.array([c for c, _, _ in COUNTRIES])
    offsets = np.array([o for _, o, _ in COUNTRIES], dtype=np.int64)
    return device, surface, codes[home[event_user]], offsets[home[event_user]]


def _timestamps(
    cfg: SyntheticConfig, rng: np.random.Generator, offset: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Unix timestamps spread over the last `days` days (daily activity curve in local time) and local hours.

    The last day is left out so that no event, whatever its UTC offset, lies after END_TIMESTAMP.
    """
    n = offset.shape[0]
    day = rng.integers(0, cfg.days - 1, n)
    activity = np.array(HOURLY_ACTIVITY)
    hour = np.asarray(rng.choice(24, size=n, p=activity / activity.sum()), dtype=np.int64)
    second = rng.integers(0, 3600, n)
    start = END_TIMESTAMP - cfg.days * 86_400
    ts = start + day * 86_400 + hour * 3600 + second - offset * 60
    return ts.astype(np.int64), hour


def _context_combo(device: npt.NDArray[np.int64], local_hour: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Index 0..5 of the event's (device class, night) pair; device class 0 mobile, 1 desktop, 2 other."""
    device_class = np.where(device == DeviceType.MOBILE, 0, np.where(device == DeviceType.DESKTOP, 1, 2))
    return np.asarray(device_class * 2 + is_night_hour(local_hour), dtype=np.int64)


def _boost_table(n_categories: int) -> npt.NDArray[np.float64]:
    """Context boost per (device class, night) combination and category: shape [6, n_categories]."""
    table = np.zeros((6, n_categories))
    mobile = list(MOBILE_CATEGORIES)
    night = list(NIGHT_CATEGORIES)
    for device_class in range(3):
        for is_night in (0, 1):
            row = device_class * 2 + is_night
            if device_class == 0:
                table[row, mobile] += MOBILE_BOOST
            elif device_class == 1:
                table[row, mobile] -= MOBILE_BOOST
            table[row, night] += NIGHT_BOOST if is_night else -NIGHT_BOOST
    return table


def _sample_items(
    rng: np.random.Generator,
    user_latent: npt.NDArray[np.float32],
    item_latent: npt.NDArray[np.float32],
    log_pop: npt.NDArray[np.float32],
    boost: npt.NDArray[np.float64],
    event_user: npt.NDArray[np.int64],
    combo: npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Draw each event's item from its user's softmax under the event's context.

    Users are handled in chunks: for every (user, context combination) the
    choice distribution's CDF is built once, the CDFs are laid end to end with
    row k shifted by k, and one `searchsorted` draws all the chunk's events.
    """
    n_items = item_latent.shape[0]
    n_combos = boost.shape[0]
    context_weight = np.exp(boost)  # exp(a + b) = exp(a) * exp(b): the context factor is shared by all users
    out = np.empty(event_user.shape[0], dtype=np.int64)
    bounds = np.searchsorted(event_user, np.arange(0, user_latent.shape[0] + _USER_CHUNK, _USER_CHUNK))
    for chunk, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        first = chunk * _USER_CHUNK
        users = user_latent[first : first + _USER_CHUNK].astype(np.float64)
        base = TASTE_SCALE * users @ item_latent.T.astype(np.float64) + log_pop
        user_weight = np.exp(base - base.max(axis=1, keepdims=True))
        weights = (user_weight[:, None, :] * context_weight[None, :, :]).reshape(-1, n_items)
        cdf = np.cumsum(weights, axis=1)
        cdf /= cdf[:, -1:]
        cdf += np.arange(cdf.shape[0])[:, None]
        rows = (event_user[lo:hi] - first) * n_combos + combo[lo:hi]
        picked = np.searchsorted(cdf.ravel(), rows + rng.random(hi - lo), side="right") - rows * n_items
        out[lo:hi] = np.clip(picked, 0, n_items - 1)
    return out
