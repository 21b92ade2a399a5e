"""The versions of the served model: load, validate, warm, activate, roll back, and follow the repository.

A version becomes servable only after `Bundle.load` validated every file and a warm-up ran its index and
ranker; then one reference swap (`BundleSlot.swap`) makes it active. Requests read the slot once, so a request
in flight finishes on the bundle it started with, and the old bundle is freed when the last one ends.
Loading and warm-up run on their own single thread, so serving threads and the event loop never wait on them.
A version that fails to load is marked FAILED with its reason and never served; the active one keeps serving.

Which version should be active: a pin (from the admin API, or `policy.json` in the model's folder) when set,
else the newest version that has not failed. `reconcile()` moves the server there; the watcher calls it on a
timer. See docs/model-repo.md.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from hyperrec.core import metrics
from hyperrec.core.bundle import MANIFEST, Bundle, list_versions
from hyperrec.core.domain import RecommendRequest
from hyperrec.core.errors import BundleError, FailedPrecondition, NotFound
from hyperrec.core.names import check_name
from hyperrec.core.pipeline import BundleSlot, warm_up
from hyperrec.core.ranker import ACCELERATOR_DEVICES, RankerOptions

log = logging.getLogger(__name__)

POLICY = "policy.json"


class VersionState(enum.Enum):
    LOADING = "loading"
    READY = "ready"  # loaded and warm, not serving
    ACTIVE = "active"
    CANARY = "canary"  # serving a fixed share of users next to the active version
    FAILED = "failed"


@dataclass
class VersionInfo:
    """What the server knows about one version directory."""

    version: int
    state: VersionState
    reason: str = ""
    fingerprint: str = ""  # SHA-256 of manifest.json when last tried: a changed file is tried again
    load_ms: float = 0.0
    warm_ms: float = 0.0


@dataclass(frozen=True)
class VersionLoadSettings:
    ranker: RankerOptions = field(default_factory=RankerOptions)
    warmup_requests: int = 32
    candidates: int = 500
    keep_previous: bool = True  # keep the version swapped out loaded, for an instant rollback
    affinity_half_life_s: float | None = None  # the profiles' half-life, which behaviour features must match
    index_device: str = "auto"  # where the ANN index searches: "auto", "cpu" or "gpu"


def load_without_gc_pauses(directory: Path, ranker: RankerOptions, index_device: str) -> Bundle:
    """Bundle.load with the cyclic garbage collector paused, then the loaded objects frozen.

    A format 1 bundle's load creates a Python object per item (its ids come as JSON). With the collector on, their
    allocation triggers full collections that hold the GIL and stall the event loop while it serves; a probe
    loading a 1M-item format 1 bundle beside an asyncio loop measured the load 40 % faster and the worst loop stall
    20-30 % shorter without them (docs/performance.md). Format 2 bundles create few objects, and pausing costs them
    nothing. Freezing moves what exists after the load out of later collections. The collector is paused
    process-wide, for the load's few seconds only.
    """
    gc.disable()
    try:
        return Bundle.load(directory, ranker, index_device)
    finally:
        gc.freeze()
        gc.enable()


def manifest_fingerprint(directory: Path) -> str:
    """SHA-256 of the version's manifest, or "" while it has none (a version still being copied)."""
    try:
        return hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass(frozen=True)
class Policy:
    """What `policy.json` asks for: a stable version (None: the newest usable), a canary and its share."""

    stable: int | None = None
    canary: int | None = None
    canary_percent: float = 0.0


def _version_field(value: object, name: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def read_policy(model_dir: Path) -> Policy:
    """`policy.json`: {"version": N} pins N; {"labels": {"stable": N, "canary": M}, "canary_percent": P} serves N
    and routes P % of users to M. Absent or broken (logged): the newest usable version, no canary."""
    path = model_dir / POLICY
    if not path.is_file():
        return Policy()
    try:
        data = json.loads(path.read_text())
        labels = data.get("labels", {})
        stable = _version_field(data.get("version"), "version") or _version_field(labels.get("stable"), "stable")
        canary = _version_field(labels.get("canary"), "canary")
        percent = float(data.get("canary_percent", 0.0))
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"canary_percent must be within 0-100, got {percent}")
        return Policy(stable, canary, percent if canary is not None else 0.0)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.error("ignoring %s: %s", path, exc)
        return Policy()


def record_accelerators(bundle: Bundle) -> None:
    """Set hyperrec_accelerator_info for the served bundle: 1 on each component's device, 0 on the others."""
    for component, device in (("ranker", bundle.ranker.device), ("index", bundle.index.device)):
        for candidate in ACCELERATOR_DEVICES:
            metrics.ACCELERATOR.labels(component, candidate).set(1 if candidate == device else 0)


class ModelManager:
    """Owns the versions of one model and the slot the pipeline reads. One change at a time."""

    def __init__(
        self,
        repo: Path,
        model_name: str,
        slot: BundleSlot,
        settings: VersionLoadSettings,
        loader: Executor,
        recorded: Callable[[], Sequence[RecommendRequest]] = tuple,
    ) -> None:
        self.repo = Path(repo)
        self._recorded = recorded
        self.model_name = check_name(model_name)
        self._slot = slot
        self._settings = settings
        self._loader = loader
        self._bundles: dict[int, Bundle] = {}
        self._info: dict[int, VersionInfo] = {}
        self._active: int | None = None
        self.canary: int | None = None
        self.canary_percent = 0.0
        self._history: list[int] = []  # versions that were active before, most recent last
        self.pinned: int | None = None  # set by the admin API; overrides policy.json and "newest"
        self._lock = asyncio.Lock()

    @property
    def model_dir(self) -> Path:
        return self.repo / self.model_name

    @property
    def active(self) -> int | None:
        return self._active

    def status(self) -> list[VersionInfo]:
        return [self._info[v] for v in sorted(self._info)]

    def _directory(self, version: int) -> Path:
        return self.model_dir / str(version)

    async def _load(self, version: int) -> Bundle:
        """Load, validate and warm `version` (cached when already loaded from the same manifest)."""
        directory = self._directory(version)
        if version not in list_versions(self.repo, self.model_name):
            raise NotFound(f"model {self.model_name!r} has no version {version}")
        fingerprint = manifest_fingerprint(directory)
        known = self._info.get(version)
        if known is not None and known.fingerprint == fingerprint and version in self._bundles:
            return self._bundles[version]
        info = VersionInfo(version, VersionState.LOADING, fingerprint=fingerprint)
        self._info[version] = info
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            bundle = await loop.run_in_executor(
                self._loader, load_without_gc_pauses, directory, self._settings.ranker, self._settings.index_device
            )
            if bundle.model_name != self.model_name:
                raise BundleError(MANIFEST, f"names model {bundle.model_name!r}, not {self.model_name!r}")
        except BundleError as exc:
            info.state, info.reason = VersionState.FAILED, str(exc)
            metrics.MODEL_LOADS.labels(self.model_name, "failed").inc()
            log.error("model %s version %d rejected: %s", self.model_name, version, exc)
            raise
        info.load_ms = (time.perf_counter() - started) * 1e3
        s = self._settings
        shapes = list(self._recorded())  # recent real requests, when the server has answered some
        info.warm_ms = await loop.run_in_executor(
            self._loader, warm_up, bundle, s.warmup_requests, s.candidates, shapes
        )
        self._bundles[version] = bundle
        info.state = VersionState.READY
        self._warn_on_half_life(bundle)
        metrics.MODEL_LOADS.labels(self.model_name, "loaded").inc()
        log.info(
            "model %s version %d ready (%d items, index %s on %s, ranker on %s); loaded in %.0f ms, warm %.2f ms",
            self.model_name,
            version,
            bundle.index.size,
            bundle.index.kind_name,
            bundle.index.device,
            ",".join(bundle.ranker.providers),
            info.load_ms,
            info.warm_ms,
        )
        return bundle

    def _warn_on_half_life(self, bundle: Bundle) -> None:
        trained, served = bundle.feature_spec.affinity_half_life_s, self._settings.affinity_half_life_s
        if trained and served is not None and abs(trained - served) > 1e-6:
            log.warning(
                "model %s version %s was trained with an affinity half-life of %.2f days, profiles use %.2f: "
                "behaviour features will differ from training",
                bundle.model_name,
                bundle.version,
                trained / 86_400.0,
                served / 86_400.0,
            )

    async def load(self, version: int) -> VersionInfo:
        """Load and warm a version without serving it (admin "load")."""
        async with self._lock:
            await self._load(version)
            return self._info[version]

    async def _activate(self, version: int) -> Bundle:
        bundle = await self._load(version)
        if self._active == version and self._slot.active is bundle:
            return bundle
        previous = self._active
        self._slot.swap(bundle)  # the one reference every new request reads (a promoted canary stops being one)
        self._active = version
        if version == self.canary:
            self.canary, self.canary_percent = None, 0.0
        self._info[version].state = VersionState.ACTIVE
        if previous is not None and previous != version:
            if previous in self._info and self._info[previous].state == VersionState.ACTIVE:
                self._info[previous].state = VersionState.READY
            self._history = [v for v in self._history if v != previous] + [previous]
            if not self._settings.keep_previous and previous != self.canary:
                # Freed once the requests still holding it finish; a rollback then loads it again.
                self._bundles.pop(previous, None)
                self._info.pop(previous, None)
        metrics.ACTIVE_VERSION.labels(self.model_name).set(version)
        record_accelerators(bundle)
        log.info("model %s: version %d active (was %s)", self.model_name, version, previous)
        return bundle

    async def activate(self, version: int, pin: bool = True) -> Bundle:
        """Make `version` the served one (loading it first if needed); with `pin` the watcher keeps it."""
        async with self._lock:
            bundle = await self._activate(version)
            if pin:
                self.pinned = version
            return bundle

    async def rollback(self) -> int:
        """Serve the version that was active before the current one again, and pin it."""
        async with self._lock:
            on_disk = list_versions(self.repo, self.model_name)
            candidates = [v for v in self._history if v != self._active and v in on_disk]
            if not candidates:
                raise FailedPrecondition(f"model {self.model_name!r} has no earlier version to roll back to")
            target = candidates[-1]
            await self._activate(target)
            self._history = [v for v in self._history if v != target]
            self.pinned = target
            return target

    async def unload(self, version: int) -> None:
        """Release a loaded version that is not serving."""
        async with self._lock:
            if version == self._active:
                raise FailedPrecondition(f"version {version} is active; activate another one first")
            if version not in self._info:
                raise NotFound(f"model {self.model_name!r} version {version} is not loaded")
            self._bundles.pop(version, None)
            del self._info[version]

    def unpin(self) -> None:
        self.pinned = None

    def _usable(self, version: int) -> bool:
        """False for a version that failed and whose manifest has not changed since."""
        info = self._info.get(version)
        if info is None or info.state != VersionState.FAILED:
            return True
        return info.fingerprint != manifest_fingerprint(self._directory(version))

    def desired(self, policy: Policy, versions: Sequence[int]) -> int | None:
        """The version that should serve among `versions` (ascending): the admin pin, else the policy pin, else
        the newest that has not failed. A pinned version that failed keeps the current one serving."""
        for pin in (self.pinned, policy.stable):
            if pin is not None and pin in versions:
                return pin if self._usable(pin) else self._active
        for version in reversed(versions):
            if self._usable(version):
                return version
        return None

    async def reconcile(self) -> int | None:
        """One pass of the watcher: forget removed versions, move to the desired version, then apply the
        policy's canary. Returns the active version. A version that fails is recorded and skipped; the next
        pass tries the next best."""
        async with self._lock:
            versions = list_versions(self.repo, self.model_name)  # one look at the folder and the policy per pass
            policy = read_policy(self.model_dir)
            on_disk = set(versions)
            for version in [v for v in self._info if v not in on_disk and v not in (self._active, self.canary)]:
                self._bundles.pop(version, None)
                del self._info[version]
                log.info("model %s version %d removed from the repository", self.model_name, version)
            while True:
                target = self.desired(policy, versions)
                if target is None or target == self._active:
                    break
                try:
                    await self._activate(target)
                    break
                except BundleError:
                    continue  # marked FAILED with this fingerprint: desired() now skips it
            if self._active is not None and self._active not in on_disk:
                log.warning("model %s: active version %d left the repository", self.model_name, self._active)
            await self._apply_canary(policy, on_disk)
            return self._active

    async def _apply_canary(self, policy: Policy, on_disk: set[int]) -> None:
        """Route the policy's share of users to its canary version (loaded first), or stop a canary."""
        wanted = policy.canary
        if wanted is not None and (wanted not in on_disk or wanted == self._active or not self._usable(wanted)):
            wanted = None
        bundle = None
        if wanted is not None:
            try:
                bundle = await self._load(wanted)
            except BundleError:
                wanted = None
        old = self._info.get(self.canary) if self.canary is not None and self.canary != wanted else None
        if old is not None and old.state == VersionState.CANARY:
            old.state = VersionState.READY
        percent = policy.canary_percent if wanted is not None else 0.0
        if (wanted, percent) != (self.canary, self.canary_percent):
            log.info("model %s: canary %s for %.1f%% of users", self.model_name, wanted, percent)
        self._slot.set_canary(bundle, percent)
        self.canary, self.canary_percent = wanted, percent
        if wanted is not None:
            self._info[wanted].state = VersionState.CANARY

    async def watch(self, interval_s: float, stop: asyncio.Event) -> None:
        """Reconcile every `interval_s` until `stop` is set. Errors are logged, never fatal."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.reconcile()
            except Exception:  # the watcher must outlive any one bad pass
                log.exception("model %s: repository watch pass failed", self.model_name)
