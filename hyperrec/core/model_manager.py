"""The versions of the served model: load, validate, warm, activate, roll back, and follow the repository.

A version becomes servable only after `Bundle.load` validated every file and a warm-up ran its index and
ranker; then one reference swap (`BundleSlot.swap`) makes it active. Requests read the slot once, so a request
in flight finishes on the bundle it started with, and the old bundle is freed when the last one ends.
Loading and warm-up run on their own single thread, so serving threads and the event loop never wait on them.
A version that fails to load is marked FAILED with its reason and never served; the active one keeps serving.

Which version should be active: this process's override (`--model-version`) when set, else the pin in
`policy.json` in the model's folder (written by the admin API, or by hand), else the newest version that has not
failed. Admin pins, rollbacks and pin releases are written to `policy.json` (hyperrec/core/policy.py), so every
replica sharing the repository follows them. `reconcile()` moves the server there; the watcher calls it on a
timer. Folder scans and file reads run on worker threads, so slow shared storage never stalls the event loop.
See docs/model-repo.md.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from hyperrec.core import metrics
from hyperrec.core.bundle import MANIFEST, Bundle, list_versions
from hyperrec.core.domain import RecommendRequest
from hyperrec.core.errors import Aborted, BundleError, FailedPrecondition, NotFound
from hyperrec.core.names import check_name
from hyperrec.core.pipeline import BundleSlot, warm_up
from hyperrec.core.policy import (
    POLICY,
    Change,
    Policy,
    PolicyRecord,
    canary_change,
    load_policy,
    pin_change,
    release_change,
    write_policy,
)
from hyperrec.core.ranker import ACCELERATOR_DEVICES, RankerOptions

log = logging.getLogger(__name__)


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
        replica: str = "",
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
        # This process's own pin (`--model-version`): wins over policy.json until an admin call here changes it.
        self.override: int | None = None
        self.policy = PolicyRecord()  # policy.json as last read or written
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"  # "updated_by" in what it writes
        self._lock = asyncio.Lock()

    @property
    def model_dir(self) -> Path:
        return self.repo / self.model_name

    @property
    def active(self) -> int | None:
        return self._active

    @property
    def pinned(self) -> int | None:
        """The pin this server follows: its own override, else policy.json's (None: the newest usable)."""
        return self.override if self.override is not None else self.policy.policy.stable

    def status(self) -> list[VersionInfo]:
        return [self._info[v] for v in sorted(self._info)]

    def _directory(self, version: int) -> Path:
        return self.model_dir / str(version)

    async def _load(self, version: int) -> Bundle:
        """Load, validate and warm `version` (cached when already loaded from the same manifest)."""
        directory = self._directory(version)
        if version not in await asyncio.to_thread(list_versions, self.repo, self.model_name):
            raise NotFound(f"model {self.model_name!r} has no version {version}")
        fingerprint = await asyncio.to_thread(manifest_fingerprint, directory)
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
        """Make `version` the served one (loading it first if needed). With `pin` it becomes this process's
        override (`--model-version`), kept over policy.json; nothing is written to the shared repository."""
        async with self._lock:
            bundle = await self._activate(version)
            if pin:
                self.override = version
            self.policy = await self._read_policy()  # ListModels shows the file this override wins over
            return bundle

    async def pin(self, version: int) -> Bundle:
        """Admin "activate": serve `version` here, then pin it in policy.json so every replica follows.
        A version that fails to load writes nothing. Aborted when another writer changed the file since this
        call read it; this server then returns to what the file says."""
        async with self._lock:
            base = await self._read_policy()
            bundle = await self._activate(version)
            await self._publish(base, pin_change(version), "ActivateVersion")
            return bundle

    async def rollback(self) -> int:
        """Serve the version that was active here before the current one again, and pin it in policy.json."""
        async with self._lock:
            base = await self._read_policy()
            on_disk = await asyncio.to_thread(list_versions, self.repo, self.model_name)
            candidates = [v for v in self._history if v != self._active and v in on_disk]
            if not candidates:
                raise FailedPrecondition(f"model {self.model_name!r} has no earlier version to roll back to")
            target = candidates[-1]
            await self._activate(target)
            self._history = [v for v in self._history if v != target]
            await self._publish(base, pin_change(target), "Rollback")
            return target

    async def release_pin(self) -> None:
        """Admin "release pin": remove the pin from policy.json (and this process's override), so every replica
        follows the newest usable version again at its next watcher pass."""
        async with self._lock:
            base = await self._read_policy()
            await self._publish(base, release_change, "ReleasePin")

    async def set_canary(self, version: int | None, percent: float) -> None:
        """Route `percent` % of users to `version` on every replica (None stops the canary), through policy.json;
        this server applies it at once."""
        async with self._lock:
            base = await self._read_policy()
            on_disk = await asyncio.to_thread(list_versions, self.repo, self.model_name)
            if version is not None and version not in on_disk:
                raise NotFound(f"model {self.model_name!r} has no version {version}")
            await self._publish(base, canary_change(version, percent), "SetCanary")
            await self._converge()

    async def unload(self, version: int) -> None:
        """Release a loaded version that is not serving."""
        async with self._lock:
            if version == self._active:
                raise FailedPrecondition(f"version {version} is active; activate another one first")
            if version not in self._info:
                raise NotFound(f"model {self.model_name!r} version {version} is not loaded")
            self._bundles.pop(version, None)
            del self._info[version]

    async def _read_policy(self) -> PolicyRecord:
        """policy.json, read on a worker thread (shared storage may be slow)."""
        return await asyncio.to_thread(load_policy, self.model_dir)

    async def _publish(self, base: PolicyRecord, change: Change, source: str) -> None:
        """Write `change` to policy.json if it is still `base`; an admin change here ends this process's override.
        When another writer won, return to what the file now says and re-raise Aborted; when the file cannot be
        written (a read-only mount), return to it as well and fail with the reason."""
        try:
            self.policy = await asyncio.to_thread(write_policy, self.model_dir, base, change, self.replica, source)
        except Aborted:
            await self._converge()
            raise
        except OSError as exc:
            await self._converge()
            raise FailedPrecondition(
                f"cannot write {self.model_dir / POLICY} ({exc}): admin changes need the model repository writable "
                "by the servers (docs/model-repo.md)"
            ) from None
        self.override = None

    async def _failed_fingerprints(self, versions: Sequence[int]) -> dict[int, str]:
        """The current manifest fingerprint of each failed version among `versions`, read on a worker thread."""
        failed = [v for v in versions if (i := self._info.get(v)) is not None and i.state == VersionState.FAILED]
        directories = {v: self._directory(v) for v in failed}
        return await asyncio.to_thread(lambda: {v: manifest_fingerprint(d) for v, d in directories.items()})

    def _usable(self, version: int, fingerprints: dict[int, str]) -> bool:
        """False for a version that failed and whose manifest (in `fingerprints`) has not changed since."""
        info = self._info.get(version)
        if info is None or info.state != VersionState.FAILED:
            return True
        return info.fingerprint != fingerprints.get(version, "")

    def desired(self, policy: Policy, versions: Sequence[int], fingerprints: dict[int, str]) -> int | None:
        """The version that should serve among `versions` (ascending): this process's override, else the
        policy's pin, else the newest that has not failed. A pinned version that failed keeps the current one
        serving."""
        for pin in (self.override, policy.stable):
            if pin is not None and pin in versions:
                return pin if self._usable(pin, fingerprints) else self._active
        for version in reversed(versions):
            if self._usable(version, fingerprints):
                return version
        return None

    async def reconcile(self) -> int | None:
        """One pass of the watcher: forget removed versions, move to the desired version, then apply the
        policy's canary. Returns the active version. A version that fails is recorded and skipped; the next
        pass tries the next best."""
        async with self._lock:
            return await self._converge()

    async def _converge(self) -> int | None:
        """reconcile() with the lock held: one look at the folder and the policy (on a worker thread), then the
        moves it asks for."""
        versions, record = await asyncio.gather(
            asyncio.to_thread(list_versions, self.repo, self.model_name), self._read_policy()
        )
        if record.revision != self.policy.revision or record.digest != self.policy.digest:
            log.info("model %s: policy %s revision %d", self.model_name, record.source, record.revision)
        self.policy = record
        policy = record.policy
        on_disk = set(versions)
        for version in [v for v in self._info if v not in on_disk and v not in (self._active, self.canary)]:
            self._bundles.pop(version, None)
            del self._info[version]
            log.info("model %s version %d removed from the repository", self.model_name, version)
        while True:
            fingerprints = await self._failed_fingerprints(versions)
            target = self.desired(policy, versions, fingerprints)
            if target is None or target == self._active:
                break
            try:
                await self._activate(target)
                break
            except BundleError:
                continue  # marked FAILED with this fingerprint: desired() now skips it
        if self._active is not None and self._active not in on_disk:
            log.warning("model %s: active version %d left the repository", self.model_name, self._active)
        fingerprints = await self._failed_fingerprints(versions)
        await self._apply_canary(policy, on_disk, fingerprints)
        return self._active

    async def _apply_canary(self, policy: Policy, on_disk: set[int], fingerprints: dict[int, str]) -> None:
        """Route the policy's share of users to its canary version (loaded first), or stop a canary."""
        wanted = policy.canary
        usable = wanted is not None and self._usable(wanted, fingerprints)
        if wanted is not None and (wanted not in on_disk or wanted == self._active or not usable):
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
