"""The gRPC servicer: one short method per RPC. Requests become dataclasses here, GpuManager does the
work, and KybernateError subclasses become statuses here only (plus trailing metadata naming the
process, step and driver error). Anything else is a bug: logged, answered INTERNAL, never leaked.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc

from kybernate.api import hookd_pb2 as pb
from kybernate.api import hookd_pb2_grpc
from kybernate.hooks.api import convert
from kybernate.hooks.api import store as store_layout
from kybernate.hooks.api.errors import METADATA_DRIVER_ERROR, METADATA_PID, METADATA_STEP, Code, KybernateError

from .manager import ContainerRef, GpuManager
from .metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# The shared Code enum (kybernate.shim.ttrpc.codes) -> grpc's status objects, by number.
_STATUS = {Code(code.value[0]): code for code in grpc.StatusCode}


# The store's on-disk errors (hooks/api/store.py, shared with the shim and the CLI) carry no status of their own.
_STORE_CODES: tuple[tuple[type[store_layout.StoreError], Code], ...] = (
    (store_layout.BadKey, Code.INVALID_ARGUMENT),
    (store_layout.NotFound, Code.NOT_FOUND),
    (store_layout.StoreFull, Code.RESOURCE_EXHAUSTED),
    (store_layout.Corrupt, Code.DATA_LOSS),
    (store_layout.StoreError, Code.ABORTED),
)


def to_status(err: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The one mapping of hookd's errors to gRPC statuses (Hookd and Store services); None: a bug."""
    if isinstance(err, KybernateError):
        return _STATUS.get(Code.from_wire(int(err.code)), grpc.StatusCode.UNKNOWN), err.message
    for kind, code in _STORE_CODES:
        if isinstance(err, kind):
            return _STATUS[code], str(err)
    return None


def container_ref(msg: pb.ContainerRef) -> ContainerRef:
    return ContainerRef(msg.namespace, msg.container_id, tuple(msg.pids), msg.cgroup_path)


class HookdService(hookd_pb2_grpc.HookdServicer):
    def __init__(self, manager: GpuManager, metrics: Metrics) -> None:
        self._manager = manager
        self._metrics = metrics

    async def CheckpointGpu(self, request: pb.CheckpointGpuRequest, context: Any) -> pb.CheckpointGpuResponse:  # noqa: N802
        ref = container_ref(request.container)
        result = await self._edge("CheckpointGpu", ref, context,
                                  self._manager.checkpoint(ref, request.lock_timeout_ms))
        return convert.checkpoint_to_pb(result)

    async def RestoreGpu(self, request: pb.RestoreGpuRequest, context: Any) -> pb.RestoreGpuResponse:  # noqa: N802
        ref = container_ref(request.container)
        manifest = convert.manifest_from_pb(request.manifest) if request.HasField("manifest") else None
        result = await self._edge("RestoreGpu", ref, context,
                                  self._manager.restore(ref, manifest, dict(request.gpu_map)))
        return convert.restore_to_pb(result)

    async def GpuStatus(self, request: pb.GpuStatusRequest, context: Any) -> pb.GpuStatusResponse:  # noqa: N802
        ref = container_ref(request.container)
        return convert.status_to_pb(await self._edge("GpuStatus", ref, context, self._manager.status(ref)))

    async def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthResponse:  # noqa: N802
        return convert.health_to_pb(await self._edge("Health", None, context, self._manager.health()))

    async def _edge(self, rpc: str, ref: ContainerRef | None, context: Any, work: Awaitable[T]) -> T:
        fields = {"rpc": rpc, **({"container": ref.name} if ref else {})}
        try:
            result = await work
        except KybernateError as err:
            status, _ = to_status(err) or (grpc.StatusCode.UNKNOWN, "")
            self._metrics.request(rpc, status.name)
            log.warning("request failed", extra={"fields": {**fields, "status": status.name, "error": err.message}})
            metadata = tuple((key, str(value)) for key, value in (
                (METADATA_PID, err.pid), (METADATA_STEP, err.step), (METADATA_DRIVER_ERROR, err.driver_error))
                if value is not None)
            await context.abort(status, err.message, trailing_metadata=metadata)
            raise AssertionError("context.abort returned") from err
        except Exception as err:
            # A bug, not an answer: log it whole, tell the caller where to look, keep the details here.
            self._metrics.request(rpc, grpc.StatusCode.INTERNAL.name)
            log.exception("request crashed", extra={"fields": fields})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in kybernate-hookd ({type(err).__name__}): "
                                                          "see its log (journalctl -u kybernate-hookd)")
            raise AssertionError("context.abort returned") from err
        self._metrics.request(rpc, "ok")
        log.debug("request done", extra={"fields": fields})
        return result
