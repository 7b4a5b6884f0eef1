"""The task service containerd talks to: every call goes to the runc shim; five calls get GPU steps.

Each intercepted RPC is one short method: decode what we need, run the GPU step in its place, forward,
map errors once. Everything else is forwarded as bytes, so containerd's behaviour stays exact.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import any_pb2

from kybernate.api import runc_options_pb2, task_pb2

from . import gpu_steps, manager, restore_from, runtime_options
from .gpu_steps import Event, GpuStepError, GpuSteps, Phase, TaskControl, TaskGpu
from .runtime_options import KybernateOptions, RuntimeConfig
from .ttrpc.errors import Code, TTRPCError
from .ttrpc.server import Call
from .upstream import TASK_SERVICES, Upstream

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace-ttrpc"
CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"


class TaskService:
    def __init__(
        self,
        upstream: Upstream,
        namespace: str,
        defaults: RuntimeConfig,
        driver_for: Callable[[KybernateOptions], gpu_steps.GpuDriver],
    ) -> None:
        self.upstream = upstream
        self.namespace = namespace
        self.defaults = defaults
        self.gpu = GpuSteps(
            control=TaskControl(pids=self._pids, freeze=self._freeze, thaw=self._thaw),
            driver_for=driver_for,
        )
        self._intercepted: dict[str, Callable[[Call], Awaitable[bytes]]] = {
            "Create": self.create,
            "Start": self.start,
            "Pause": self.pause,
            "Resume": self.resume,
            "Checkpoint": self.checkpoint,
            "Delete": self.delete,
            "Connect": self.connect,
            "Shutdown": self.shutdown,
        }

    async def handle(self, call: Call) -> bytes:
        if call.service not in TASK_SERVICES:
            raise TTRPCError(Code.UNIMPLEMENTED, f"service {call.service} is not served by the kybernate shim")
        method = self._intercepted.get(call.method)
        if method is None:
            return await self.upstream.forward(call)
        return await method(call)

    # --- intercepted calls -------------------------------------------------------------------------

    async def create(self, call: Call) -> bytes:
        request = _decode(task_pb2.CreateTaskRequest, call)
        options, changed = self._options_for_child(request)
        spec = _read_spec(request.bundle)
        try:
            options = gpu_steps.options_with_annotations(options, spec)
        except GpuStepError as err:
            raise TTRPCError(Code.INVALID_ARGUMENT, str(err)) from err
        plan = await self._restore_plan(request, spec, options.checkpoint_dir)
        if plan is not None:
            request.checkpoint = plan.checkpoint_dir  # runc restores from it at Start
            changed = True
        phase, manifest = self._gpu_phase(spec, request.checkpoint)
        reply = await self.upstream.forward(call, request.SerializeToString() if changed else None)
        if plan is not None:
            await self._apply_rootfs(request.id, request.bundle, plan)
        self.gpu.created(TaskGpu(request.id, self.namespace, request.bundle, options, phase, manifest=manifest))
        return reply

    async def start(self, call: Call) -> bytes:
        request = _decode(task_pb2.StartRequest, call)
        reply = await self.upstream.forward(call)
        if not request.exec_id:
            await self._gpu_step(Event.START, request.id, "restore GPU state after runc restored the task")
        return reply

    async def pause(self, call: Call) -> bytes:
        request = _decode(task_pb2.PauseRequest, call)
        await self._gpu_step(Event.PAUSE, request.id, "checkpoint GPU state before pausing")
        try:
            reply = await self.upstream.forward(call)
        except TTRPCError:
            await self._gpu_step(Event.PAUSE_FAILED, request.id, "restore GPU state after a failed pause")
            raise
        self._set_paused(request.id, True)
        return reply

    async def resume(self, call: Call) -> bytes:
        request = _decode(task_pb2.ResumeRequest, call)
        reply = await self.upstream.forward(call)
        self._set_paused(request.id, False)
        await self._gpu_step(Event.RESUME, request.id, "restore GPU state after resuming")
        return reply

    async def checkpoint(self, call: Call) -> bytes:
        request = _decode(task_pb2.CheckpointTaskRequest, call)
        await self._gpu_step(Event.CHECKPOINT, request.id, "checkpoint GPU state before the CRIU dump")
        task = self.gpu.tasks.get(request.id)
        if task is not None and task.phase is Phase.CHECKPOINTED and task.manifest is not None and request.path:
            self._gpu_error_to_status(lambda: gpu_steps.write_manifest(request.path, task.manifest or {}))
        try:
            reply = await self.upstream.forward(call)
        except TTRPCError:
            await self._gpu_step(Event.CHECKPOINT_FAILED, request.id, "restore GPU state after a failed checkpoint")
            raise
        if not _checkpoint_exits(request.options if request.HasField("options") else None):
            await self._gpu_step(Event.CHECKPOINT_DONE, request.id, "restore GPU state after checkpoint")
        return reply

    async def delete(self, call: Call) -> bytes:
        request = _decode(task_pb2.DeleteRequest, call)
        reply = await self.upstream.forward(call)
        if not request.exec_id:
            self.gpu.forget(request.id)
        return reply

    async def connect(self, call: Call) -> bytes:
        reply = task_pb2.ConnectResponse.FromString(await self.upstream.forward(call))
        # containerd treats the shim pid as the process to watch and kill: that is us, not the child.
        reply.shim_pid = os.getpid()
        return reply.SerializeToString()

    async def shutdown(self, call: Call) -> bytes:
        try:
            return await self.upstream.forward(call)
        except TTRPCError as err:
            if err.code == Code.UNAVAILABLE:  # the runc shim exited while answering: that is the point
                return b""
            raise

    # --- helpers -----------------------------------------------------------------------------------

    def _options_for_child(self, request: Any) -> tuple[KybernateOptions, bool]:
        """Kybernate's settings for this task; rewrites request.options into what the runc shim reads.

        Returns whether the request changed. The runc shim casts options blindly: CRI's must become runc
        options (or none); no options at all get the node's defaults.
        """
        given = request.options if request.HasField("options") else None
        if given is not None and runtime_options.bare_type(given.type_url) == runtime_options.RUNC_OPTIONS_TYPE:
            return self.defaults.kybernate, False  # already runc's: handed on untouched
        try:
            config = self.defaults if given is None else runtime_options.from_any(given)
        except runtime_options.OptionsError as err:
            raise TTRPCError(Code.INVALID_ARGUMENT, str(err)) from err
        converted = config.runc_any()
        if converted is not None:
            request.options.CopyFrom(converted)
            return config.kybernate, True
        if given is not None:
            request.ClearField("options")
            return config.kybernate, True
        return config.kybernate, False

    def _gpu_phase(self, spec: dict[str, Any], checkpoint_dir: str) -> tuple[Phase, dict[str, Any] | None]:
        """Where a new task starts in the GPU lifecycle, with the manifest of the checkpoint it comes from."""
        if not gpu_steps.is_gpu_container(spec):
            return Phase.NO_GPU, None
        if not checkpoint_dir:
            return Phase.LIVE, None
        manifest = self._gpu_error_to_status(lambda: gpu_steps.read_manifest(checkpoint_dir))
        if manifest is not None and manifest.get("processes"):
            return Phase.RESTORE_PENDING, manifest
        return Phase.LIVE, manifest

    async def _restore_plan(
        self, request: Any, spec: dict[str, Any], checkpoint_dir: str
    ) -> restore_from.RestorePlan | None:
        """Unpack the archive `kybernate.io/restore-from` names; any problem fails the Create, nothing started."""
        try:
            reference = restore_from.requested(spec)
            if reference is None:
                return None
            if request.checkpoint:
                raise restore_from.RestoreError(f"{restore_from.ANNOTATION} and a checkpoint were both given")
            if reference.startswith("store:"):  # the checkpoint store (docs/store.md): verified, not copied
                from . import restore_store

                plan = await asyncio.to_thread(restore_store.prepare, reference, request.id)
            else:
                workdir = os.path.join(request.bundle, restore_from.WORKDIR_NAME)
                archive = restore_from.resolve(reference, checkpoint_dir)
                # Unpacking reads and writes up to the size of the container's memory: off the event loop.
                plan = await asyncio.to_thread(restore_from.unpack, archive, workdir)
        except restore_from.RestoreError as err:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"{request.id}: cannot restore: {err}") from err
        archived = restore_from.archived_container_name(plan)
        name = (spec.get("annotations") or {}).get(restore_from.CONTAINER_NAME)
        if archived and name and archived != name:
            # A pod annotation reaches every container of the pod; only the one the archive holds restores.
            log.info("restore-from archive holds another container; starting this one fresh",
                     extra={"fields": {"id": request.id, "container": name, "archived": archived}})
            await asyncio.to_thread(shutil.rmtree, os.path.dirname(plan.checkpoint_dir), True)
            return None
        log.info("restoring from archive", extra={"fields": {"id": request.id, "archive": plan.archive}})
        return plan

    async def _apply_rootfs(self, container_id: str, bundle: str, plan: restore_from.RestorePlan) -> None:
        try:
            await asyncio.to_thread(restore_from.apply_rootfs, plan, os.path.join(bundle, "rootfs"))
        except restore_from.RestoreError as err:
            # containerd will not know of the task: take it back out of the runc shim.
            await self.upstream.call("Delete", task_pb2.DeleteRequest(id=container_id), task_pb2.DeleteResponse,
                                     metadata=self._metadata())
            raise TTRPCError(Code.FAILED_PRECONDITION, f"{container_id}: cannot restore: {err}") from err

    def _set_paused(self, container_id: str, paused: bool) -> None:
        task = self.gpu.tasks.get(container_id)
        if task is not None:
            task.paused = paused

    async def _gpu_step(self, event: Event, container_id: str, what: str) -> None:
        if self.gpu.phase(container_id) is Phase.NO_GPU:
            return  # the common case: no GPU, no daemon, nothing imported
        from kybernate.hooks.client import HookdError, HookdUnavailable

        try:
            await self.gpu.on(event, container_id)
        except HookdUnavailable as err:
            raise TTRPCError(Code.UNAVAILABLE, f"{container_id}: cannot {what}: {err}") from err
        except HookdError as err:
            raise TTRPCError(Code.from_wire(int(err.code)), f"{container_id}: cannot {what}: {err.message}") from err
        except (GpuStepError, TimeoutError) as err:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"{container_id}: cannot {what}: {err}") from err

    @staticmethod
    def _gpu_error_to_status(step: Callable[[], Any]) -> Any:
        try:
            return step()
        except (GpuStepError, OSError) as err:
            raise TTRPCError(Code.FAILED_PRECONDITION, str(err)) from err

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((NAMESPACE_KEY, self.namespace),)

    async def _pids(self, container_id: str) -> list[int]:
        reply = await self.upstream.call(
            "Pids", task_pb2.PidsRequest(id=container_id), task_pb2.PidsResponse, metadata=self._metadata()
        )
        return [p.pid for p in reply.processes]

    async def _freeze(self, container_id: str) -> None:
        await self.upstream.call("Pause", task_pb2.PauseRequest(id=container_id), task_pb2.Empty,
                                 metadata=self._metadata())

    async def _thaw(self, container_id: str) -> None:
        await self.upstream.call("Resume", task_pb2.ResumeRequest(id=container_id), task_pb2.Empty,
                                 metadata=self._metadata())


def _decode(kind: type[Any], call: Call) -> Any:
    try:
        return kind.FromString(call.payload)
    except Exception as err:  # protobuf's DecodeError
        raise TTRPCError(Code.INVALID_ARGUMENT, f"{call.method}: request is not a valid {kind.__name__}") from err


def _checkpoint_exits(options: any_pb2.Any | None) -> bool:
    if options is None or runtime_options.bare_type(options.type_url) != CHECKPOINT_OPTIONS_TYPE:
        return False
    return runc_options_pb2.CheckpointOptions.FromString(options.value).exit


def _read_spec(bundle: str) -> dict[str, Any]:
    try:
        return manager.read_spec(bundle)
    except manager.StartError as err:
        raise TTRPCError(Code.INVALID_ARGUMENT, str(err)) from err
