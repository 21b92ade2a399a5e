"""What the load tester sends: users (Zipf over known ids plus unknown ones), k, exclusions and contexts.

A scenario file (YAML) may set any of:

```yaml
k: 20                      # items per request
exclusions: 5              # random catalogue-like ids excluded per request (0: none)
unknown_user_share: 0.1    # share of requests from users the server has never seen (cold start)
zipf_exponent: 1.1         # popularity skew of known users (rank r drawn with weight 1 / r^s)
contexts:                  # drawn by weight; fields as in the Context message
  - {device: mobile, surface: home, country: DE, weight: 3}
  - {device: desktop, surface: search, weight: 1}
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hyperrec.client.aio import Context, Request, build_context, new_request

_KEYS = {"k", "exclusions", "unknown_user_share", "zipf_exponent", "contexts"}
_CONTEXT_KEYS = {"device", "surface", "country", "utc_offset_minutes", "weight"}


class ScenarioError(ValueError):
    """The scenario file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class Scenario:
    k: int = 20
    exclusions: int = 0
    unknown_user_share: float = 0.1
    zipf_exponent: float = 1.1
    contexts: tuple[Mapping[str, Any], ...] = field(default_factory=lambda: ({"weight": 1.0},))


def load_scenario(path: Path | None) -> Scenario:
    if path is None:
        return Scenario()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: must be a mapping")
    unknown = set(data) - _KEYS
    if unknown:
        raise ScenarioError(f"{path}: unknown keys {sorted(unknown)}")
    try:
        scenario = Scenario(
            k=int(data.get("k", 20)),
            exclusions=int(data.get("exclusions", 0)),
            unknown_user_share=float(data.get("unknown_user_share", 0.1)),
            zipf_exponent=float(data.get("zipf_exponent", 1.1)),
            contexts=tuple(dict(c) for c in data.get("contexts", [{"weight": 1.0}])),
        )
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    if scenario.k < 1 or scenario.exclusions < 0 or not 0 <= scenario.unknown_user_share <= 1:
        raise ScenarioError(f"{path}: k must be >= 1, exclusions >= 0, unknown_user_share within 0..1")
    for ctx in scenario.contexts:
        bad = set(ctx) - _CONTEXT_KEYS
        if bad:
            raise ScenarioError(f"{path}: contexts: unknown keys {sorted(bad)}")
    return scenario


def _context(spec: Mapping[str, Any]) -> Context:
    """The request context a scenario's `contexts` entry describes (device and surface default to unspecified)."""
    return build_context(
        device=str(spec.get("device", "unspecified")),
        surface=str(spec.get("surface", "unspecified")),
        country=str(spec.get("country", "")),
        utc_offset_minutes=int(spec.get("utc_offset_minutes", 0)),
    )


class RequestSource:
    """Draws requests for one worker: deterministic for a seed, cheap per request (pre-built messages)."""

    def __init__(self, scenario: Scenario, users: Sequence[str], seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._scenario = scenario
        self._users = list(users) or ["user-0"]
        ranks = np.arange(1, len(self._users) + 1, dtype=np.float64)
        weights = ranks**-scenario.zipf_exponent
        self._user_cdf = np.cumsum(weights / weights.sum())
        self._contexts = [_context(c) for c in scenario.contexts]
        context_weights = np.array([float(c.get("weight", 1.0)) for c in scenario.contexts])
        self._context_cdf = np.cumsum(context_weights / context_weights.sum())
        self._seed = seed
        self._count = 0

    def next(self) -> Request:
        """The next request: a Zipf-drawn known user or a new one, a weighted context, random exclusions."""
        self._count += 1
        s = self._scenario
        if self._rng.random() < s.unknown_user_share:
            user = f"loadtest-new-{self._seed}-{self._count}"
        else:
            user = self._users[
                int(np.searchsorted(self._user_cdf, self._rng.random(), side="right").clip(0, len(self._users) - 1))
            ]
        context = self._contexts[
            int(np.searchsorted(self._context_cdf, self._rng.random(), side="right").clip(0, len(self._contexts) - 1))
        ]
        exclude = [f"item-{int(i):05d}" for i in self._rng.integers(0, 100_000, s.exclusions)] if s.exclusions else []
        return new_request(user, s.k, context, exclude)


def _draw(cdf: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with the probabilities whose cumulative sums are `cdf`."""
    return min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)


def load_users(path: Path | None, count: int) -> list[str]:
    """User ids from a profile snapshot (.npz) or a text file (one per line), else `count` ids "u00000"..."""
    if path is None:
        return [f"u{n:05d}" for n in range(count)]
    if Path(path).suffix == ".npz":
        from hyperrec.profiles.snapshot import snapshot_user_ids

        return snapshot_user_ids(Path(path))
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
