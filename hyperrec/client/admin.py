"""A synchronous client for the ModelAdmin service (used by `hyperrec models` and the load tester's actions).

Each function makes one call on a channel of its own and returns plain values: a version's state is its
lower-case name ("ready", "active", "failed", ...). A refused call raises ClientError.
"""

from __future__ import annotations

from dataclasses import dataclass

from hyperrec.client.connect import Connection
from hyperrec.v1 import admin_pb2 as apb
from hyperrec.v1 import admin_pb2_grpc as apb_grpc

STATE_NAMES = {v.number: v.name.removeprefix("VERSION_STATE_").lower() for v in apb.VersionState.DESCRIPTOR.values}
FAILED = STATE_NAMES[apb.VERSION_STATE_FAILED]


@dataclass(frozen=True)
class VersionState:
    """One version the server knows: its state, how long loading and warming took, and why it is in that state."""

    version: int
    state: str
    reason: str = ""
    load_ms: float = 0.0
    warm_ms: float = 0.0

    @property
    def failed(self) -> bool:
        """Whether loading, validating or warming the version failed (`reason` says why)."""
        return self.state == FAILED


@dataclass(frozen=True)
class ModelState:
    """One model on the server: the active and pinned versions (0: none), the versions it has loaded (or tried to),
    every version its repository holds, and where its policy comes from (policy.json's path, or "none") at which
    revision, written by whom and when."""

    name: str
    active_version: int
    pinned_version: int
    versions: tuple[VersionState, ...]
    available_versions: tuple[int, ...]
    canary_version: int = 0
    canary_percent: float = 0.0
    policy_source: str = "none"
    policy_revision: int = 0
    policy_updated_by: str = ""
    policy_updated_at: str = ""


def _version(status: apb.VersionStatus) -> VersionState:
    """The plain values of a VersionStatus message."""
    return VersionState(status.version, STATE_NAMES[status.state], status.reason, status.load_ms, status.warm_ms)


def _model(status: apb.ModelStatus) -> ModelState:
    """The plain values of a ModelStatus message."""
    return ModelState(
        name=status.name,
        active_version=status.active_version,
        pinned_version=status.pinned_version,
        versions=tuple(_version(v) for v in status.versions),
        available_versions=tuple(status.available_versions),
        canary_version=status.canary_version,
        canary_percent=status.canary_percent,
        policy_source=status.policy_source or "none",
        policy_revision=status.policy_revision,
        policy_updated_by=status.policy_updated_by,
        policy_updated_at=status.policy_updated_at,
    )


def list_models(connection: Connection, timeout_s: float) -> list[ModelState]:
    """Every model the server serves, with its versions' states."""
    reply = connection.unary(apb_grpc.ModelAdminStub, "ListModels", apb.ListModelsRequest(), timeout_s)
    return [_model(m) for m in reply.models]


def load_version(connection: Connection, model: str, version: int, timeout_s: float) -> VersionState:
    """Load, validate and warm a version without serving it; its state afterwards ("failed" with a reason)."""
    request = apb.LoadVersionRequest(model=model, version=version)
    reply = connection.unary(apb_grpc.ModelAdminStub, "LoadVersion", request, timeout_s)
    return _version(reply.status)


def activate_version(connection: Connection, model: str, version: int, timeout_s: float) -> ModelState:
    """Serve a version and pin it; the model's state afterwards."""
    request = apb.ActivateVersionRequest(model=model, version=version)
    reply = connection.unary(apb_grpc.ModelAdminStub, "ActivateVersion", request, timeout_s)
    return _model(reply.model)


def rollback(connection: Connection, model: str, timeout_s: float) -> ModelState:
    """Serve the previously active version and pin it; the model's state afterwards."""
    request = apb.RollbackRequest(model=model)
    reply = connection.unary(apb_grpc.ModelAdminStub, "Rollback", request, timeout_s)
    return _model(reply.model)


def unload_version(connection: Connection, model: str, version: int, timeout_s: float) -> ModelState:
    """Free a loaded version that is not serving (FAILED_PRECONDITION for the active one); the model's state."""
    request = apb.UnloadVersionRequest(model=model, version=version)
    reply = connection.unary(apb_grpc.ModelAdminStub, "UnloadVersion", request, timeout_s)
    return _model(reply.model)


def release_pin(connection: Connection, model: str, timeout_s: float) -> ModelState:
    """Remove the pin from the model's policy.json, so every replica serves the newest usable version again."""
    request = apb.ReleasePinRequest(model=model)
    reply = connection.unary(apb_grpc.ModelAdminStub, "ReleasePin", request, timeout_s)
    return _model(reply.model)


def set_canary(connection: Connection, model: str, version: int, percent: float, timeout_s: float) -> ModelState:
    """Route `percent` % of users to canary `version` on every replica (version 0 stops the canary)."""
    request = apb.SetCanaryRequest(model=model, version=version, percent=percent)
    reply = connection.unary(apb_grpc.ModelAdminStub, "SetCanary", request, timeout_s)
    return _model(reply.model)


def format_model(model: ModelState) -> str:
    """A model as `hyperrec models` prints it: active and pinned versions, the policy's source and revision, a table
    of loaded versions, the rest."""
    pinned = f", pinned {model.pinned_version}" if model.pinned_version else ""
    if model.canary_version:
        pinned += f", canary {model.canary_version} for {model.canary_percent:g}% of users"
    written = f" by {model.policy_updated_by} at {model.policy_updated_at}" if model.policy_updated_by else ""
    lines = [
        f"model {model.name}: active {model.active_version or 'none'}{pinned}",
        f"policy: {model.policy_source}, revision {model.policy_revision}{written}",
        f"{'version':>8}  {'state':<8}  {'load ms':>8}  {'warm ms':>8}  reason",
    ]
    for v in model.versions:
        lines.append(f"{v.version:>8}  {v.state:<8}  {v.load_ms:>8.0f}  {v.warm_ms:>8.2f}  {v.reason}")
    unseen = sorted(set(model.available_versions) - {v.version for v in model.versions})
    if unseen:
        lines.append(f"not loaded: {', '.join(str(v) for v in unseen)}")
    return "\n".join(lines)
