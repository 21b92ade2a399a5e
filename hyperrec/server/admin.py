"""The ModelAdmin gRPC servicer: decode, call the model manager, encode. The admin token is checked by
hyperrec/server/gate.py before a call gets here."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from hyperrec.core.bundle import list_versions
from hyperrec.core.errors import BundleError, InvalidArgument, NotFound
from hyperrec.core.model_manager import ModelManager, VersionInfo, VersionState
from hyperrec.core.names import check_name
from hyperrec.server.servicer import Context, answer, unary_handlers
from hyperrec.v1 import admin_pb2 as apb

ADMIN_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["ModelAdmin"].full_name

_STATE = {
    VersionState.LOADING: apb.VERSION_STATE_LOADING,
    VersionState.READY: apb.VERSION_STATE_READY,
    VersionState.ACTIVE: apb.VERSION_STATE_ACTIVE,
    VersionState.FAILED: apb.VERSION_STATE_FAILED,
    VersionState.CANARY: apb.VERSION_STATE_CANARY,
}


def encode_version(info: VersionInfo) -> apb.VersionStatus:
    return apb.VersionStatus(
        version=info.version, state=_STATE[info.state], reason=info.reason, load_ms=info.load_ms, warm_ms=info.warm_ms
    )


def encode_model(manager: ModelManager, available: list[int]) -> apb.ModelStatus:
    """The model's state, its policy as last read or written, and the version folders present (`available`)."""
    policy = manager.policy
    return apb.ModelStatus(
        name=manager.model_name,
        active_version=manager.active or 0,
        pinned_version=manager.pinned or 0,
        versions=[encode_version(info) for info in manager.status()],
        available_versions=available,
        canary_version=manager.canary or 0,
        canary_percent=manager.canary_percent,
        policy_source=policy.source,
        policy_revision=policy.revision,
        policy_updated_by=policy.updated_by,
        policy_updated_at=policy.updated_at,
    )


async def model_status(manager: ModelManager) -> apb.ModelStatus:
    """encode_model, with the repository's folder listed on a worker thread (shared storage may be slow)."""
    return encode_model(manager, await asyncio.to_thread(list_versions, manager.repo, manager.model_name))


class ModelAdminServicer:
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def _model(self, name: str) -> ModelManager:
        try:
            check_name(name)
        except ValueError as exc:
            raise InvalidArgument("model", str(exc)) from None
        if name != self._manager.model_name:
            raise NotFound(f"this server serves model {self._manager.model_name!r}, not {name!r}")
        return self._manager

    @staticmethod
    def _version(version: int) -> int:
        if version < 1:
            raise InvalidArgument("version", f"must be a positive version number, got {version}")
        return version

    async def ListModels(self, raw: bytes, context: Context) -> apb.ListModelsResponse:  # noqa: N802
        async def run(_: apb.ListModelsRequest, __: str, ___: float | None) -> apb.ListModelsResponse:
            return apb.ListModelsResponse(models=[await model_status(self._manager)])

        return await answer(apb.ListModelsRequest, raw, context, run)

    async def LoadVersion(self, raw: bytes, context: Context) -> apb.LoadVersionResponse:  # noqa: N802
        async def run(request: apb.LoadVersionRequest, _: str, __: float | None) -> apb.LoadVersionResponse:
            manager = self._model(request.model)
            version = self._version(request.version)
            try:
                info = await manager.load(version)
            except BundleError:
                info = next(i for i in manager.status() if i.version == version)
            return apb.LoadVersionResponse(status=encode_version(info))

        return await answer(apb.LoadVersionRequest, raw, context, run)

    async def ActivateVersion(self, raw: bytes, context: Context) -> apb.ActivateVersionResponse:  # noqa: N802
        async def run(request: apb.ActivateVersionRequest, _: str, __: float | None) -> apb.ActivateVersionResponse:
            manager = self._model(request.model)
            await manager.pin(self._version(request.version))
            return apb.ActivateVersionResponse(model=await model_status(manager))

        return await answer(apb.ActivateVersionRequest, raw, context, run)

    async def Rollback(self, raw: bytes, context: Context) -> apb.RollbackResponse:  # noqa: N802
        async def run(request: apb.RollbackRequest, _: str, __: float | None) -> apb.RollbackResponse:
            manager = self._model(request.model)
            await manager.rollback()
            return apb.RollbackResponse(model=await model_status(manager))

        return await answer(apb.RollbackRequest, raw, context, run)

    async def UnloadVersion(self, raw: bytes, context: Context) -> apb.UnloadVersionResponse:  # noqa: N802
        async def run(request: apb.UnloadVersionRequest, _: str, __: float | None) -> apb.UnloadVersionResponse:
            manager = self._model(request.model)
            await manager.unload(self._version(request.version))
            return apb.UnloadVersionResponse(model=await model_status(manager))

        return await answer(apb.UnloadVersionRequest, raw, context, run)

    async def ReleasePin(self, raw: bytes, context: Context) -> apb.ReleasePinResponse:  # noqa: N802
        async def run(request: apb.ReleasePinRequest, _: str, __: float | None) -> apb.ReleasePinResponse:
            manager = self._model(request.model)
            await manager.release_pin()
            return apb.ReleasePinResponse(model=await model_status(manager))

        return await answer(apb.ReleasePinRequest, raw, context, run)

    async def SetCanary(self, raw: bytes, context: Context) -> apb.SetCanaryResponse:  # noqa: N802
        async def run(request: apb.SetCanaryRequest, _: str, __: float | None) -> apb.SetCanaryResponse:
            manager = self._model(request.model)
            version = self._version(request.version) if request.version else None
            if version is not None and not 0.0 <= request.percent <= 100.0:
                raise InvalidArgument("percent", f"must be within 0-100, got {request.percent}")
            await manager.set_canary(version, request.percent)
            return apb.SetCanaryResponse(model=await model_status(manager))

        return await answer(apb.SetCanaryRequest, raw, context, run)


def add_admin_to_server(servicer: ModelAdminServicer, server: grpc.aio.Server) -> None:
    methods: dict[str, tuple[Any, Any]] = {
        "ListModels": (servicer.ListModels, apb.ListModelsResponse.SerializeToString),
        "LoadVersion": (servicer.LoadVersion, apb.LoadVersionResponse.SerializeToString),
        "ActivateVersion": (servicer.ActivateVersion, apb.ActivateVersionResponse.SerializeToString),
        "Rollback": (servicer.Rollback, apb.RollbackResponse.SerializeToString),
        "UnloadVersion": (servicer.UnloadVersion, apb.UnloadVersionResponse.SerializeToString),
        "ReleasePin": (servicer.ReleasePin, apb.ReleasePinResponse.SerializeToString),
        "SetCanary": (servicer.SetCanary, apb.SetCanaryResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((unary_handlers(ADMIN_SERVICE_NAME, methods),))
