"""The task service containerd talks to: every call goes to the runc shim; five calls get GPU steps.

Each intercepted RPC is one short method: decode what we need, run the GPU step in its place, forward,
map errors once. Everything else is forwarded as bytes, so containerd's behaviour stays exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2

from kybernate.api import runc_options_pb2, task_pb2
from kybernate.hooks.api.checkpoint import CHECKPOINT_OPTIONS_TYPE

from . import criu_config, criu_errors, gpu_steps, manager, restore_from, runtime_options
from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, to_status
from .events import EVENTS_SERVICE, EventsProxy
from .gpu_steps import Event, GpuSteps, Phase, TaskControl, TaskGpu
from .hibernate import HIBERNATE_SERVICE, Hibernation
from .runtime_options import KybernateOptions, RuntimeConfig
from .taskspec import TaskSpec
from .ttrpc.errors import Code, TTRPCError
from .ttrpc.protocol import Response
from .ttrpc.server import Answer, Call
from .upstream import TASK_SERVICES, Upstream

if TYPE_CHECKING:
    from kybernate.hooks.api.model import GpuManifest, StoreCheckpointResult  # loaded when first needed

    from .passlane import Lane
    from .resilience import StoreCheckpoints  # loaded for the first task that asks for store checkpoints

log = logging.getLogger(__name__)

NAMESPACE_KEY = "containerd-namespace-ttrpc"
SIGKILL = 9
# How long Start waits for a task it had to kill (its GPU state could not be restored) to exit.
KILL_WAIT_S = 30.0


class TaskService:
    def __init__(
        self,
        upstream: Upstream,
        namespace: str,
        defaults: RuntimeConfig,
        driver_for: Callable[[KybernateOptions], gpu_steps.GpuDriver],
        events: EventsProxy | None = None,
    ) -> None:
        self.upstream = upstream
        self.events = events
        self.namespace = namespace
        self.defaults = defaults
        self.gpu = GpuSteps(
            control=TaskControl(pids=self._pids, freeze=self._freeze, thaw=self._thaw),
            driver_for=driver_for,
        )
        self._background: set[asyncio.Task[None]] = set()
        # Tasks whose Start the handler would only forward (no GPU state, no restore, no VRAM to make room for,
        # no store checkpoints): containerd's Start for them takes the pass-through.
        self._plain_starts: set[str] = set()
        # Init pids as the child answered them: at Create for a task created without a checkpoint (final from
        # there on), at Start for every task through start(). containerd's Connect (its pid query) for them is
        # answered here, without a hop to the child.
        self._task_pids: dict[str, int] = {}
        # The pass lane (shim/passlane.py), when the daemon has one: what it may do for a task is mirrored into
        # it from the two tables above (_mirror) and from the gate below (sync_lane), as they change.
        self.lane: Lane | None = None
        # The CRIU config file each task's config.json names (ours, not a user's) and its extra options: written
        # before the task's first dump (criu_config.write_once), not at Create.
        self._criu_files: dict[str, tuple[str, tuple[str, ...]]] = {}
        # Seconds the child took for a task's last dump and restore (runc + CRIU, no GPU step): hibernate's floors.
        self.child_seconds: dict[tuple[str, str], float] = {}
        self._store_checkpoints: StoreCheckpoints | None = None
        self.hibernation = Hibernation(self, events)  # standby's disk tier (shim/hibernate.py)
        self.hibernation.entries_changed = self.sync_lane
        self._intercepted: dict[str, Callable[[Call], Awaitable[bytes]]] = {
            "Create": self.create,
            "Start": self.start_from_containerd,
            "Pause": self.pause,
            "Resume": self.resume,
            "Checkpoint": self.checkpoint,
            "Kill": self.kill,
            "Delete": self.delete,
            "Wait": self.hibernation.wait,
            "Connect": self.connect,
            "Shutdown": self.shutdown,
        }

    async def handle(self, call: Call) -> bytes:
        if call.service not in TASK_SERVICES:
            return await self._other_service(call)
        try:
            if self.hibernation.entries:  # only while a task of this shim is hibernated: its calls are answered here
                answer = await self.hibernation.answer(call)
                if answer is not None:
                    return answer
            method = self._intercepted.get(call.method)
            if method is None:
                return await self.upstream.forward(call)
            return await method(call)
        except Exception as err:  # the one place errors become statuses
            raise to_status(err) from err
        finally:
            self.sync_lane()

    def sync_lane(self) -> None:
        """The lane's gate as pass_through() and the events proxy decide: no task call passes while a task is
        hibernated, Connect is answered without the handler only while no task has GPU state, events pass only
        while the proxy has no drop rule (no task hibernating or waking). Called wherever any may change."""
        if self.lane is not None:
            self.lane.gate(open_=not self.hibernation.entries, connect_local=not self.gpu.has_gpu_tasks(),
                           events_open=self.events is None or self.events.drop_rule is None)

    def _mirror(self, container_id: str) -> None:
        """A task's row of _task_pids and _plain_starts, as the lane holds it."""
        if self.lane is not None:
            self.lane.task(container_id, pid=self._task_pids.get(container_id, 0),
                           plain=container_id in self._plain_starts)

    def pass_through(self, call: Call, answer: Answer) -> Callable[[], None] | None:
        """handle()'s plain forward without a task (the server's fast path, ttrpc/server.py PassThrough): for
        a task call nothing here inspects, or an intercepted one whose handler would only forward it this time
        (_passable), while no task of this shim is hibernated. The answer is the one handle() would give: the
        child's status untouched, errors mapped by to_status. A Connect whose answer is known here
        (_known_connect) is answered without the child."""
        if call.service not in TASK_SERVICES or self.hibernation.entries:
            return None
        reply: Callable[[bytes], bytes] = _as_it_came
        if call.method == "Connect":
            if self.gpu.has_gpu_tasks():
                return None  # connect() settles GPU steps
            known = self._known_connect(call)
            if known is not None:
                asyncio.get_running_loop().call_soon(answer, Response(payload=known))
                return _nothing_to_forget
            reply = _with_our_pid  # nothing to reconcile; no task is hibernated (checked above)
        elif call.method in self._intercepted:
            passable = self._passable(call)
            if passable is None:
                return None
            reply = passable

        def answered(result: Response | Exception) -> None:
            if isinstance(result, Response):
                if not result.ok:  # a failure goes back as its status alone, as forward() raising it would
                    answer(Response.from_error(TTRPCError(
                        result.status_code, result.status_message, result.status_details)))
                elif reply is _as_it_came:
                    answer(result)
                else:
                    try:
                        answer(Response(payload=reply(result.payload)))
                    except Exception as err:  # the child's answer did not decode: as handle() would say
                        answer(Response.from_error(to_status(err)))
            else:
                answer(Response.from_error(to_status(result)))

        return self.upstream.forward_now(call, answered)

    def _passable(self, call: Call) -> Callable[[bytes], bytes] | None:
        """For an intercepted call whose handler would, this time, only forward it (and maybe rewrite the
        answer): how the child's answer becomes ours. None: the handler must run. Decided from what is known
        now; every state these checks read changes only in handlers, which run before or after, never during."""
        method = call.method
        if method == "Kill" and self._store_checkpoints is None:
            return _as_it_came
        if method == "Start":
            try:
                request = task_pb2.StartRequest.FromString(call.payload)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError: the handler answers INVALID_ARGUMENT
                return None
            if request.exec_id or request.id in self._plain_starts:
                return _as_it_came
        return None

    def _known_connect(self, call: Call) -> bytes | None:
        """The runc shim's answer to Connect, without asking it: our pid as the shim's (as _with_our_pid) and
        the task's init pid, for a task whose pid this shim knows; None for any other. The runc shim answers
        exactly these two fields (no version)."""
        try:
            request = task_pb2.ConnectRequest.FromString(call.payload)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError: the handler answers INVALID_ARGUMENT
            return None
        pid = self._task_pids.get(request.id)
        if pid is None:
            return None
        return task_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=pid).SerializeToString()

    async def _other_service(self, call: Call) -> bytes:
        """The runc child's events on their way to containerd, and our Hibernate service."""
        if call.service == EVENTS_SERVICE and self.events is not None:
            return await self.events.handle(call)
        if call.service == HIBERNATE_SERVICE:
            try:
                return await self.hibernation.serve(call)
            except Exception as err:
                raise to_status(err) from err
        raise TTRPCError(Code.UNIMPLEMENTED, f"service {call.service} is not served by the kybernate shim")

    # --- intercepted calls -------------------------------------------------------------------------

    async def create(self, call: Call) -> bytes:
        request = _decode(task_pb2.CreateTaskRequest, call)
        if request.id in self.gpu.tasks:
            raise AlreadyExists(f"{request.id}: a task of that id exists in this shim already")
        options, changed = self._options_for_child(request)
        raw_spec = _read_spec(request.bundle)
        spec = TaskSpec.parse(request.id, self.namespace, request.bundle, raw_spec, options)
        plan = await self._restore_plan(request, spec)
        if plan is not None:
            request.checkpoint = plan.checkpoint_dir  # runc restores from it at Start
            changed = True
        restoring = bool(request.checkpoint)
        criu_file = _name_criu_config(request.bundle, raw_spec, spec.options, restoring)
        phase, manifest = await self._gpu_phase(spec, request.checkpoint)
        # The intent is recorded first: a Create that cannot record it changes nothing.
        await self.gpu.created(TaskGpu(spec, phase, manifest=manifest))
        self.sync_lane()  # a task with GPU state takes Connect from the lane before anything is sent
        try:
            sent = request.SerializeToString() if changed else call.payload
            reply = await self.upstream.forward(call, sent)
            if plan is not None:
                await self._apply_rootfs(request.id, request.bundle, plan)
        except BaseException:
            await self.gpu.forget(request.id)
            raise
        if plan is not None:  # a wake creates it from its hibernate image, never from the archive again
            request.checkpoint = ""
            sent = request.SerializeToString()
        self.hibernation.created(request.id, sent)
        if criu_file is not None:
            self._criu_files[request.id] = (criu_file, spec.options.criu_options)
        if not restoring:  # a restore's pid is known only once runc restored it at Start
            self._task_pids[request.id] = task_pb2.CreateTaskResponse.FromString(reply).pid
        if spec.resilience is not None:
            self._checkpoints().created(spec)
        elif phase is Phase.NO_GPU and plan is None and not request.checkpoint and not spec.vram_request:
            self._plain_starts.add(request.id)
        self._mirror(request.id)
        return reply

    async def create_from_image(self, request: Any, spec: TaskSpec, call: Call) -> None:
        """A hibernated task created again in the child from its image (request.checkpoint), as containerd
        created it first: the same request, the same options; runc restores it at Start."""
        self._task_pids.pop(request.id, None)  # restored at Start with a new pid: Connect asks the child
        self._mirror(request.id)
        # CRIU's config needs nothing here: the first Create named it in config.json, the hibernate's dump wrote it.
        phase, manifest = await self._gpu_phase(spec, request.checkpoint)
        await self.gpu.created(TaskGpu(spec, phase, manifest=manifest))
        self.sync_lane()  # a task with GPU state takes Connect from the lane before anything is sent
        try:
            await self.upstream.forward(call, request.SerializeToString())
        except BaseException:
            await self.gpu.forget(request.id)
            raise

    async def start_from_containerd(self, call: Call) -> bytes:
        """containerd's Start: first room on the task's GPUs if it says what it needs (shim/vram_room.py)."""
        request = _decode(task_pb2.StartRequest, call) if self.gpu.tasks else None
        task = self.gpu.tasks.get(request.id) if request is not None and not request.exec_id else None
        if task is not None and (task.spec.vram_request or task.phase is Phase.RESTORE_PENDING):
            from . import vram_room
            from .hookd_driver import call_deadline

            call_deadline.set(call.deadline)
            try:
                await vram_room.make_room(task, self.gpu.driver_for(task.options))
            except Exception as err:
                asked = "its checkpoint's VRAM" if task.phase is Phase.RESTORE_PENDING else "kybernate.io/vram-request"
                raise to_status(err, f"{task.container_id}: not started (nothing ran): hookd's arbiter made no "
                                     f"room on its GPUs for {asked}; free VRAM there and start it again") from err
        return await self.start(call)

    async def start(self, call: Call) -> bytes:
        request = _decode(task_pb2.StartRequest, call)
        since = time.time()
        try:
            reply = await self.upstream.forward(call)
            if not request.exec_id:
                self.child_seconds[(request.id, "restore")] = time.time() - since
                self._task_pids[request.id] = task_pb2.StartResponse.FromString(reply).pid  # final for a restore
                self._mirror(request.id)
        except TTRPCError as err:
            if request.exec_id:
                raise
            raise await self._criu_error(err, request.id, "restore", since) from err  # runc restores at Start
        if not request.exec_id and self._store_checkpoints is not None:
            self._store_checkpoints.started(request.id)
        if request.exec_id or self.gpu.phase(request.id) is Phase.NO_GPU:
            return reply
        await self.gpu.started(request.id, task_pb2.StartResponse.FromString(reply).pid)
        try:
            await self._gpu_step(Event.START, request.id, "restore GPU state after runc restored the task", call)
        except TTRPCError as err:
            # A task running with its GPU state in host memory would look RUNNING while it cannot use its
            # GPU: stop it, so containerd's view (start failed, task stopped) is the truth.
            await self._stop_task(request.id)
            raise TTRPCError(err.code, f"{err.message}. The task was stopped; its checkpoint is unchanged: "
                                       "fix the cause and create the task from the checkpoint again") from err
        return reply

    async def pause(self, call: Call) -> bytes:
        request = _decode(task_pb2.PauseRequest, call)
        await self._gpu_step(Event.PAUSE, request.id, "checkpoint GPU state before pausing", call)
        try:
            reply = await self.upstream.forward(call)
        except TTRPCError:
            await self._gpu_step(Event.PAUSE_FAILED, request.id, "restore GPU state after a failed pause", call)
            raise
        self._set_paused(request.id, True)
        return reply

    async def resume(self, call: Call) -> bytes:
        request = _decode(task_pb2.ResumeRequest, call)
        task = self.gpu.tasks.get(request.id)
        if task is not None and not task.paused and task.phase is Phase.UNKNOWN:
            # An earlier Resume thawed the task but its GPU step failed and the task could not be frozen
            # again: runc would refuse ("not paused"); the GPU step alone finishes the resume.
            reply = task_pb2.Empty().SerializeToString()
        else:
            reply = await self.upstream.forward(call)
        self._set_paused(request.id, False)
        try:
            await self._gpu_step(Event.RESUME, request.id, "restore GPU state after resuming", call)
        except TTRPCError as err:
            raise TTRPCError(err.code, err.message + await self._refreeze(request.id)) from err
        return reply

    async def checkpoint(self, call: Call) -> bytes:
        request = _decode(task_pb2.CheckpointTaskRequest, call)
        await self._gpu_step(Event.CHECKPOINT, request.id, "checkpoint GPU state before the CRIU dump", call)
        task = self.gpu.tasks.get(request.id)
        since = time.time()
        try:
            criu_file = self._criu_files.get(request.id)
            if criu_file is not None:
                await asyncio.to_thread(_write_criu_config_once, *criu_file)
            if task is not None and task.phase is Phase.DUMPING and task.manifest is not None and request.path:
                await asyncio.to_thread(gpu_steps.write_manifest, request.path, task.manifest)
            forwarded = time.time()
            reply = await self.upstream.forward(call)
            self.child_seconds[(request.id, "dump")] = time.time() - forwarded
        except Exception as err:
            # The manifest could not be written (disk full) or the dump failed: the GPU comes back either way.
            await self._match_freezer_to_runc(request.id)
            await self._gpu_step(Event.CHECKPOINT_FAILED, request.id, "restore GPU state after a failed checkpoint",
                                 call)
            if isinstance(err, TTRPCError):
                raise await self._criu_error(err, request.id, "dump", since) from err
            raise
        if _checkpoint_exits(request.options if request.HasField("options") else None):
            if self._store_checkpoints is not None:
                self._store_checkpoints.dumped(request.id)
            await self._gpu_step(Event.CHECKPOINT_EXIT, request.id, "record the checkpoint", call)
        else:
            await self._gpu_step(Event.CHECKPOINT_DONE, request.id, "restore GPU state after checkpoint", call)
        return reply

    async def kill(self, call: Call) -> bytes:
        store = self._store_checkpoints
        if store is None:  # the common case (no task of this shim asked for store checkpoints): as it came
            return await self.upstream.forward(call)
        request = _decode(task_pb2.KillRequest, call)
        if request.exec_id:  # an exec'd process: never held
            return await self.upstream.forward(call)
        if request.signal == SIGKILL:
            try:
                return await self.upstream.forward(call)  # never delayed
            finally:
                store.killed(request.id)
        if await store.on_stop_signal(request.id, request.signal, call.deadline):
            return task_pb2.Empty().SerializeToString()  # checkpointed: the task exited through the dump
        return await self.upstream.forward(call)

    async def delete(self, call: Call) -> bytes:
        request = _decode(task_pb2.DeleteRequest, call)
        task = self.gpu.tasks.get(request.id) if not request.exec_id else None
        reply = await self.upstream.forward(call)
        if not request.exec_id:
            self._plain_starts.discard(request.id)
            self._task_pids.pop(request.id, None)
            self._mirror(request.id)
            self._criu_files.pop(request.id, None)
            await self.gpu.forget(request.id)
            self.hibernation.deleted(request.id)
            self.child_seconds.pop((request.id, "dump"), None)
            self.child_seconds.pop((request.id, "restore"), None)
            if self._store_checkpoints is not None:
                self._store_checkpoints.forget(request.id)
        if task is not None:
            _mark_deleted(task.spec.bundle)
        return reply

    async def connect(self, call: Call) -> bytes:
        reply = task_pb2.ConnectResponse.FromString(await self.upstream.forward(call))
        reply.shim_pid = os.getpid()  # as _with_our_pid
        hibernated_pid = self.hibernation.task_pid(_decode(task_pb2.ConnectRequest, call).id)
        if hibernated_pid is not None:  # the child does not know it while it is hibernated
            reply.task_pid = hibernated_pid
        # containerd (re)connected: settle tasks whose last GPU step failed, without holding up its answer.
        reconcile = asyncio.create_task(self.gpu.reconcile(), name="gpu-reconcile")
        self._background.add(reconcile)
        reconcile.add_done_callback(self._background.discard)
        return reply.SerializeToString()

    async def shutdown(self, call: Call) -> bytes:
        if self.hibernation.entries:
            # A hibernated task is still containerd's: the child (which no longer has it) must not exit.
            return task_pb2.Empty().SerializeToString()
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
            raise InvalidArgument(str(err)) from err
        converted = config.runc_any()
        if converted is not None:
            request.options.CopyFrom(converted)
            return config.kybernate, True
        if given is not None:
            request.ClearField("options")
            return config.kybernate, True
        return config.kybernate, False

    async def _gpu_phase(self, spec: TaskSpec, checkpoint_dir: str) -> tuple[Phase, GpuManifest | None]:
        """Where a new task starts in the GPU lifecycle, with the manifest of the checkpoint it comes from."""
        if not spec.gpu:
            return Phase.NO_GPU, None
        if not checkpoint_dir:
            return Phase.LIVE, None
        manifest = await asyncio.to_thread(gpu_steps.read_manifest, checkpoint_dir)
        if manifest is not None and not manifest.empty:
            return Phase.RESTORE_PENDING, manifest
        return Phase.LIVE, manifest

    async def _restore_plan(self, request: Any, spec: TaskSpec) -> restore_from.RestorePlan | None:
        """Unpack the archive `kybernate.io/restore-from` names, or the newest generation of the key for
        `kybernate.io/resume: latest`; any problem fails the Create, nothing started."""
        reference, checkpoint_dir = spec.restore_from, spec.options.checkpoint_dir
        resume = spec.resilience if spec.resilience is not None and spec.resilience.resume_latest else None
        try:
            if resume is not None and not request.checkpoint:
                from . import restore_store

                plan = await asyncio.to_thread(restore_store.prepare_latest, resume.key, request.id)
                if plan is None:
                    log.info("resume: latest: the key has no complete checkpoint; starting fresh",
                             extra={"fields": {"id": request.id, "key": resume.key}})
                    return None
            elif reference is None:
                return None
            elif request.checkpoint:
                raise restore_from.RestoreError(f"{restore_from.ANNOTATION} and a checkpoint were both given")
            elif reference.startswith("store:"):  # the checkpoint store (docs/store.md): verified, not copied
                from . import restore_store

                plan = await asyncio.to_thread(restore_store.prepare, reference, request.id)
            else:
                workdir = os.path.join(request.bundle, restore_from.WORKDIR_NAME)
                # realpath walks the filesystem (and is quadratic in the path's length): off the event loop.
                archive = await asyncio.to_thread(restore_from.resolve, reference, checkpoint_dir)
                # Unpacking reads and writes up to the size of the container's memory: off the event loop.
                plan = await asyncio.to_thread(restore_from.unpack, archive, workdir)
        except restore_from.RestoreError as err:
            raise FailedPrecondition(f"{request.id}: cannot restore: {err}") from err
        archived = await asyncio.to_thread(restore_from.archived_container_name, plan)
        name = spec.container_name
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
            raise FailedPrecondition(f"{container_id}: cannot restore: {err}") from err

    def _checkpoints(self) -> StoreCheckpoints:
        """The store checkpoints of this shim's tasks (checkpoint-on-stop, periodic), made on first use."""
        if self._store_checkpoints is None:
            from .resilience import StoreCheckpoints

            self._store_checkpoints = StoreCheckpoints(status=self._status, paused=self._is_paused,
                                                       retain=self._retain)
        return self._store_checkpoints

    async def _status(self, container_id: str) -> int:
        reply = await self.upstream.call("State", task_pb2.StateRequest(id=container_id), task_pb2.StateResponse,
                                         metadata=self._metadata())
        return int(reply.status)

    def _is_paused(self, container_id: str) -> bool:
        task = self.gpu.tasks.get(container_id)
        return task is not None and task.paused

    async def _retain(self, result: StoreCheckpointResult, keep: int) -> None:
        from .resilience import retain

        await asyncio.to_thread(retain, result.path, result.key, keep)

    def _set_paused(self, container_id: str, paused: bool) -> None:
        task = self.gpu.tasks.get(container_id)
        if task is not None:
            task.paused = paused

    async def _criu_error(self, err: TTRPCError, container_id: str, action: str, since: float) -> TTRPCError:
        """CRIU's one-line reason (and its log's path) in place of the runc shim's "criu failed: type NOTIFY",
        when CRIU left a fresh log; the status code stays the runc shim's."""
        task = self.gpu.tasks.get(container_id)
        if task is None:
            return err
        message = await asyncio.to_thread(criu_errors.explain, action, err.message, task.spec.bundle, since)
        return err if message == err.message else TTRPCError(err.code, f"{container_id}: {message}")

    async def _gpu_step(self, event: Event, container_id: str, what: str, call: Call | None = None) -> None:
        if self.gpu.phase(container_id) is Phase.NO_GPU:
            return  # the common case: no GPU, no daemon, nothing imported
        from .hookd_driver import call_deadline

        # hookd's calls end before containerd's deadline for this call (ttrpc timeout_nano), if it set one.
        call_deadline.set(call.deadline if call is not None else None)
        try:
            await self.gpu.on(event, container_id)
        except Exception as err:
            raise to_status(err, f"{container_id}: cannot {what}") from err

    async def _stop_task(self, container_id: str) -> None:
        """Kill the task and wait for it to exit (Start could not give it its GPU state back)."""
        try:
            # The init process by its pid first (ends its pid namespace), then whatever runc finds in the cgroup:
            # `all` alone reaches only the cgroup, which a restore may have missed (criu_config.restore_cgroup_root).
            for everyone in (False, True):
                with contextlib.suppress(TTRPCError):  # one of the two may find nothing left to kill
                    await self.upstream.call("Kill", task_pb2.KillRequest(id=container_id, signal=9, all=everyone),
                                             task_pb2.Empty, metadata=self._metadata())
            await asyncio.wait_for(self.upstream.call("Wait", task_pb2.WaitRequest(id=container_id),
                                                      task_pb2.WaitResponse, metadata=self._metadata()), KILL_WAIT_S)
        except (TTRPCError, TimeoutError) as err:
            log.error("could not stop a task whose GPU restore failed", extra={"fields": {
                "id": container_id, "error": str(err) or f"no exit within {KILL_WAIT_S:g} s"}})

    async def _refreeze(self, container_id: str) -> str:
        """After a failed GPU step in Resume: freeze the task again so containerd shows it PAUSED, as it is
        for the GPU; a plain Resume then retries. Returns what to add to the error message."""
        try:
            await self._freeze(container_id)
        except TTRPCError as err:
            log.error("could not pause a task again after its GPU restore failed",
                      extra={"fields": {"id": container_id, "error": str(err)}})
            return "; the task runs without its GPU state: Resume again retries the GPU restore"
        await self.gpu.refrozen(container_id)
        return "; the task was paused again: Resume retries"

    async def _match_freezer_to_runc(self, container_id: str) -> None:
        """A dump that died (CRIU killed) can leave the cgroup thawed while runc's shim still counts the task
        paused (then containerd shows PAUSED and every Resume fails "not paused"), or the reverse. Put the
        cgroup where runc's shim thinks it is, so containerd's view is true and Resume works."""
        task = self.gpu.tasks.get(container_id)
        if task is None or task.phase is Phase.NO_GPU or not task.init_pid:
            return
        from kybernate.hooks.api import freezer

        def repair() -> bool:
            directory = freezer.cgroup_dir(task.init_pid)
            if directory is None or freezer.is_frozen(directory) == task.paused:
                return False
            freezer.set_frozen(directory, task.paused)
            return True

        try:
            if await asyncio.to_thread(repair):
                log.warning("the failed dump left the cgroup's freezer out of step with runc; put it back",
                            extra={"fields": {"id": container_id, "paused": task.paused}})
        except (OSError, TimeoutError) as err:
            log.error("could not put the task's freezer back after a failed dump",
                      extra={"fields": {"id": container_id, "error": str(err)}})

    def mark_deleted(self, bundle: str) -> None:
        _mark_deleted(bundle)

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


def _nothing_to_forget() -> None:
    """A call answered here: nothing was sent to the child."""


def _as_it_came(payload: bytes) -> bytes:
    return payload


def _with_our_pid(payload: bytes) -> bytes:
    """The child's ConnectResponse with our pid as the shim's: containerd treats the shim pid as the process
    to watch and kill, and that is us, not the child."""
    reply = task_pb2.ConnectResponse.FromString(payload)
    reply.shim_pid = os.getpid()
    return reply.SerializeToString()


def _decode(kind: type[Any], call: Call) -> Any:
    try:
        return kind.FromString(call.payload)
    except Exception as err:  # protobuf's DecodeError
        raise InvalidArgument(f"{call.method}: request is not a valid {kind.__name__}") from err


# In a task's bundle once the runc shim deleted the task (runc delete, rootfs unmounted): containerd's
# `delete` command that follows has nothing left to clean up, and the native client answers it without
# running the runc shim's own `delete` (shim/native/shim_client.c). containerd removes the bundle after.
DELETED_MARK = ".kybernate-task-deleted"


def _mark_deleted(bundle: str) -> None:
    try:
        os.close(os.open(os.path.join(bundle, DELETED_MARK), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    except OSError:
        pass  # no mark: `delete` runs the runc shim's cleanup, as it would anyway


def _checkpoint_exits(options: any_pb2.Any | None) -> bool:
    if options is None or runtime_options.bare_type(options.type_url) != CHECKPOINT_OPTIONS_TYPE:
        return False
    return runc_options_pb2.CheckpointOptions.FromString(options.value).exit


def _read_spec(bundle: str) -> dict[str, Any]:
    try:
        return manager.read_spec(bundle)
    except manager.StartError as err:
        raise InvalidArgument(str(err)) from err


def _name_criu_config(bundle: str, spec: dict[str, Any], options: KybernateOptions, restoring: bool) -> str | None:
    """Name our CRIU config file in config.json (runc reads the name at create); write it now only for a task
    created from a checkpoint (runc restores at Start). None: the user named their own."""
    try:
        path = criu_config.name_in_spec(bundle, spec)
        if path is not None and restoring:
            criu_config.write(path, options.criu_options, criu_config.restore_cgroup_root(spec))
    except OSError as err:
        raise FailedPrecondition(f"cannot write the CRIU configuration into the bundle {bundle}: {err}") from err
    return path


def _write_criu_config_once(path: str, extra: tuple[str, ...]) -> None:
    try:
        criu_config.write_once(path, extra)
    except OSError as err:
        raise FailedPrecondition(f"cannot write the CRIU configuration {path} before the dump: {err}") from err
