"""Hibernate (standby tier `disk`): a task dumped to disk and gone, while containerd still sees it RUNNING.

`Hibernate(id, image_path)` runs the shim's own Checkpoint path with exit (GPU state first, then CRIU's dump,
which ends the processes), waits for the runc child to reap the init and deletes the task in the child (runc
delete: its cgroup and rootfs mount go, the container's snapshot stays). `Wake(id, image_path)` creates the
task in the child again from the CreateTaskRequest containerd sent at Create (kept here as bytes), with
`checkpoint` = the image, and starts it: runc restores it with CRIU, and the shim's Start runs the GPU restore.
Same container id, bundle, stdio; containerd never saw an exit.

While a task is hibernated (or on its way in or out) this module answers containerd's calls for it:

- State: RUNNING (PAUSED if it was RAM-parked when it was dumped) with the pid containerd knows.
- Wait: blocks; a Wait the child answered because of the dump is issued again after the wake.
- Pids: empty (no process exists). Stats: the cgroup metrics type the task had, all zero.
- Kill with a stop signal (HUP, INT, QUIT, KILL, TERM): no wake; the task is marked exited with 128+signal and
  a TaskExit is published to containerd, so containerd and CRI see an ordinary stop. Signal 0 answers OK; any
  other signal is refused FAILED_PRECONDITION (the process that would receive it does not exist: wake first).
- Delete (after such an exit): answered here, TaskDelete published.
- Exec, Pause, Resume, Checkpoint, Update, CloseIO, ResizePty, Start, Create: FAILED_PRECONDITION, saying to
  wake it first. Calls that arrive during a hibernate or a wake in progress wait for it to settle.

The child's own events for the task (the dump's TaskExit, TaskDelete, the restore's TaskCreate and TaskStart)
are dropped on their way to containerd (shim/events.py); the stdio fifos are held open by this process while
the task is down, so containerd's readers never see end-of-file.

Safety: a failed hibernate leaves the task as it was (the Checkpoint path's rollback: running, or paused with
its GPU state in host RAM). A failed wake takes the half-made task back out of the child and leaves it
hibernated, image untouched: Wake again retries. If this daemon dies while a task is hibernated, containerd
sees the shim gone and the task exited; the image stays where it was written (hookd's store: `kybernate
restore`, `kybernate.io/restore-from`), and `<bundle>/.kybernate-hibernated.json` says where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2, timestamp_pb2

from kybernate.api import runc_options_pb2, task_pb2
from kybernate.hooks.api.checkpoint import CHECKPOINT_OPTIONS_TYPE

from . import events
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .ttrpc.errors import Code, TTRPCError
from .ttrpc.server import Call

if TYPE_CHECKING:
    from kybernate.api import hibernate_pb2  # loaded on the first Hibernate call: the start path never pays

    from .service import TaskService
    from .taskspec import TaskSpec

log = logging.getLogger(__name__)

HIBERNATE_SERVICE = "kybernate.hibernate.v1.Hibernate"
RECORD_NAME = ".kybernate-hibernated.json"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
# Signals that end a hibernated task without waking it (what a stop sends); 128+signal is its exit status.
STOP_SIGNALS = frozenset({1, 2, 3, 9, 15})
REAP_TIMEOUT_S = 30.0  # the dumped init's exit, as the child reaps it
DELETE_TIMEOUT_S = 30.0  # runc delete in the child
STATE_TIMEOUT_S = 10.0
TASK_EXIT_TYPE = "containerd.events.TaskExit"
TASK_DELETE_TYPE = "containerd.events.TaskDelete"
RUNNING, PAUSED, STOPPED = task_pb2.RUNNING, task_pb2.PAUSED, task_pb2.STOPPED
_TOPICS = frozenset({events.TASK_EXIT, events.TASK_DELETE, events.TASK_CREATE, events.TASK_START})


class Stage(enum.Enum):
    HIBERNATING = "hibernating"  # the dump is running: the child still has the task
    HIBERNATED = "hibernated"  # no process; the image holds it
    WAKING = "waking"  # the child is restoring it
    EXITED = "exited"  # stopped while hibernated; answered until containerd's Delete


@dataclass
class Hibernated:
    """One hibernated task: what containerd knew of it, and where it is now. Only the event loop touches it."""

    container_id: str
    namespace: str
    bundle: str
    spec: TaskSpec
    create_request: bytes
    pid: int
    was_paused: bool
    stdin: str
    stdout: str
    stderr: str
    stats_type: str
    image: str
    stage: Stage = Stage.HIBERNATING
    held_fds: list[int] = field(default_factory=list)
    child_has_task: bool = True
    exit_status: int = 0
    exited_at_ns: int = 0
    since: float = field(default_factory=time.time)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # set while no hibernate/wake is running
    done: asyncio.Event = field(default_factory=asyncio.Event)  # woken or exited: blocked Waits look again


class Hibernation:
    """The hibernated tasks of one shim, and the calls containerd makes for them."""

    def __init__(self, service: TaskService, proxy: events.EventsProxy | None) -> None:
        self.service = service
        self.proxy = proxy
        self.entries: dict[str, Hibernated] = {}
        self._requests: dict[str, bytes] = {}  # every task's CreateTaskRequest as the child got it
        self._epoch: dict[str, int] = {}  # bumped when a dump begins: a Wait answered across it is stale
        self._late_start: set[str] = set()  # woken: the child's TaskStart may still be on its way
        self._starting: set[str] = set()  # a Hibernate checking its preconditions
        self.entries_changed: Callable[[], None] = _nothing  # the task service's pass lane follows `entries`

    # --- bookkeeping the task service calls ------------------------------------------------------------

    def created(self, container_id: str, request: bytes) -> None:
        self._requests[container_id] = request

    def deleted(self, container_id: str) -> None:
        self._requests.pop(container_id, None)
        self._epoch.pop(container_id, None)
        self._late_start.discard(container_id)
        self._update_rule()

    # --- the Hibernate service -------------------------------------------------------------------------

    async def serve(self, call: Call) -> bytes:
        from kybernate.api import hibernate_pb2

        if call.method == "Hibernate":
            request = _decode(hibernate_pb2.HibernateRequest, call)
            return (await self.hibernate(request.id, request.image_path, call.deadline)).SerializeToString()
        if call.method == "Wake":
            request = _decode(hibernate_pb2.WakeRequest, call)
            return (await self.wake(request.id, request.image_path, call.deadline)).SerializeToString()
        raise TTRPCError(Code.UNIMPLEMENTED, f"{HIBERNATE_SERVICE}/{call.method} does not exist")

    async def hibernate(self, container_id: str, image: str, deadline: float | None) -> hibernate_pb2.HibernateResponse:
        began = time.monotonic()
        if self.proxy is None:
            # The runc child publishes straight to containerd (no TTRPC_ADDRESS was given to this shim):
            # the dump's exit would reach containerd, which would see the task stop.
            raise FailedPrecondition(f"{container_id}: this shim does not carry its runc shim's events, so a "
                                     "hibernate would look like an exit to containerd; nothing changed")
        if container_id in self.entries or container_id in self._starting:
            what = self.entries[container_id].stage.value if container_id in self.entries else "hibernating"
            raise FailedPrecondition(f"{container_id}: already {what}")
        self._starting.add(container_id)  # until the entry exists: a second Hibernate is refused, not raced
        try:
            return await self._hibernate(container_id, image, deadline, began)
        finally:
            self._starting.discard(container_id)

    async def _hibernate(self, container_id: str, image: str, deadline: float | None,
                         began: float) -> hibernate_pb2.HibernateResponse:
        from kybernate.api import hibernate_pb2

        raw = self._requests.get(container_id)
        task = self.service.gpu.tasks.get(container_id)
        if raw is None or task is None:
            raise NotFound(f"{container_id}: no task of that id was created through this shim")
        if not image or not os.path.isabs(image) or not await asyncio.to_thread(_empty_dir, image):
            raise InvalidArgument(f"{container_id}: the image path {image!r} must be an existing, empty directory")
        state = await self._child(task_pb2.StateRequest(id=container_id), "State", task_pb2.StateResponse)
        if state.status not in (RUNNING, PAUSED):
            raise FailedPrecondition(f"{container_id}: cannot hibernate a task that is "
                                     f"{task_pb2.TaskStatus.Name(state.status).lower()}; it must run or be paused")
        if state.terminal:
            raise FailedPrecondition(f"{container_id}: a task with a terminal cannot be dumped; nothing changed")
        if not await asyncio.to_thread(_owns_pid_namespace, state.pid):
            raise FailedPrecondition(
                f"{container_id}: it shares a pid namespace (the pod's shareProcessNamespace, or the sandbox's): "
                "CRIU restores its processes with their pids, which the namespace's other processes may take while "
                "it is down; only a container with a pid namespace of its own can hibernate. Nothing changed")
        entry = Hibernated(
            container_id=container_id, namespace=self.service.namespace, bundle=state.bundle or task.spec.bundle,
            spec=task.spec, create_request=raw, pid=state.pid, was_paused=state.status == PAUSED,
            stdin=state.stdin, stdout=state.stdout, stderr=state.stderr,
            stats_type=await self._stats_type(container_id), image=image)
        entry.held_fds = await asyncio.to_thread(_hold_stdio, state.stdin, state.stdout, state.stderr)
        self.entries[container_id] = entry
        self._epoch[container_id] = self._epoch.get(container_id, 0) + 1
        self._update_rule()
        try:
            options = any_pb2.Any(type_url=CHECKPOINT_OPTIONS_TYPE,
                                  value=runc_options_pb2.CheckpointOptions(exit=True).SerializeToString())
            await self.service.checkpoint(self._call("Checkpoint", task_pb2.CheckpointTaskRequest(
                id=container_id, path=image, options=options), deadline))
        except BaseException:
            # The Checkpoint path rolled the task back (running, or paused with its GPU state in host RAM).
            self._drop_entry(entry)
            raise
        dump_s = time.monotonic() - began
        try:
            await self._delete_in_child(entry)
        except Exception as err:  # the processes are gone; the next Wake deletes it first
            log.error("hibernate: the runc child could not delete the dumped task; Wake retries",
                      extra={"fields": {"id": container_id, "error": str(err)}})
        try:
            await self.service.gpu.forget(container_id)
        except Exception as err:  # the intent file stays behind; hookd's reconciler finds no process for it
            log.warning("hibernate: the GPU intent could not be removed",
                        extra={"fields": {"id": container_id, "error": str(err)}})
        await asyncio.to_thread(_write_record, entry)
        runc_dump_s = self.service.child_seconds.get((container_id, "dump"), 0.0)
        entry.stage = Stage.HIBERNATED
        entry.settled.set()
        total_s = time.monotonic() - began
        log.info("hibernated", extra={"fields": {"id": container_id, "image": image, "pid": entry.pid,
                                                 "was_paused": entry.was_paused, "dump_s": f"{dump_s:.3f}",
                                                 "runc_dump_s": f"{runc_dump_s:.3f}",
                                                 "total_s": f"{total_s:.3f}"}})
        return hibernate_pb2.HibernateResponse(pid=entry.pid, was_paused=entry.was_paused, dump_s=dump_s,
                                               total_s=total_s, runc_dump_s=runc_dump_s)

    async def wake(self, container_id: str, image: str, deadline: float | None) -> hibernate_pb2.WakeResponse:
        from kybernate.api import hibernate_pb2

        began = time.monotonic()
        if not image or not os.path.isabs(image) or not await asyncio.to_thread(os.path.isdir, image):
            raise InvalidArgument(f"{container_id}: the image path {image!r} is not a directory")
        entry = self.entries.get(container_id)
        if entry is None:
            raise FailedPrecondition(f"{container_id}: not hibernated")
        if entry.stage is not Stage.HIBERNATED:
            raise FailedPrecondition(f"{container_id}: cannot wake a task that is {entry.stage.value}")
        entry.stage = Stage.WAKING
        entry.settled.clear()
        # The child opens the output fifos for writing at the restore, which blocks until they have a reader:
        # containerd's may be gone (`ctr run -d` exits). Ours stands in until the child has its own.
        readers = await asyncio.to_thread(_open_readers, entry.stdout, entry.stderr)
        try:
            if entry.child_has_task:  # an earlier step could not delete it: what is left there runs no process
                await self._delete_in_child(entry, reap=False)
            request = task_pb2.CreateTaskRequest.FromString(entry.create_request)
            request.checkpoint = image
            await self.service.create_from_image(request, entry.spec, self._call("Create", request, deadline))
            entry.child_has_task = True
            try:
                reply = await self.service.start(self._call("Start", task_pb2.StartRequest(id=container_id), deadline))
            except BaseException:
                await self._undo_wake(entry)
                raise
        except BaseException as err:
            _release(readers)
            entry.stage = Stage.HIBERNATED
            entry.settled.set()
            log.error("wake failed; the task stays hibernated and Wake can be retried",
                      extra={"fields": {"id": container_id, "image": image, "error": str(err) or repr(err)}})
            raise
        _release(readers)
        pid = task_pb2.StartResponse.FromString(reply).pid
        self._late_start.add(container_id)
        self._drop_entry(entry)
        await asyncio.to_thread(_remove_record, entry.bundle)
        total_s = time.monotonic() - began
        runc_restore_s = self.service.child_seconds.get((container_id, "restore"), 0.0)
        # CRIU writes its restore stats into runc's work dir, containerd's per-task state dir (the bundle).
        criu_restore_s = await asyncio.to_thread(criu_stats_s, os.path.join(entry.bundle, "work", "stats-restore"),
                                                 2, 4)
        log.info("woken", extra={"fields": {"id": container_id, "image": image, "pid": pid, "pid_before": entry.pid,
                                            "hibernated_s": f"{time.time() - entry.since:.1f}",
                                            "runc_restore_s": f"{runc_restore_s:.3f}",
                                            "criu_restore_s": f"{criu_restore_s:.3f}", "total_s": f"{total_s:.3f}"}})
        return hibernate_pb2.WakeResponse(pid=pid, total_s=total_s, runc_restore_s=runc_restore_s,
                                          criu_restore_s=criu_restore_s)

    # --- containerd's calls for a hibernated task ------------------------------------------------------

    async def answer(self, call: Call) -> bytes | None:
        """The answer for a task call about a hibernated task; None when the call goes the usual way."""
        from kybernate.api import hibernate_pb2

        entry = self.entries.get(events.first_string_field(call.payload))
        if entry is None or call.method in ("Wait", "Connect", "Shutdown"):
            return None  # Wait: wait(); Connect and Shutdown are the shim's, not one task's
        method = call.method
        if method == "State":
            return self._state(entry, call)
        if method == "Pids":
            return task_pb2.PidsResponse().SerializeToString()
        if method == "Stats":
            stats = any_pb2.Any(type_url=entry.stats_type) if entry.stats_type else None
            return hibernate_pb2.StatsResponse(stats=stats).SerializeToString()
        if entry.stage in (Stage.HIBERNATING, Stage.WAKING):
            await entry.settled.wait()  # bounded by the call's own deadline (the server cancels us)
            return await self.answer(call)
        if method == "Kill":
            return await self._kill(entry, _decode(task_pb2.KillRequest, call))
        if method == "Delete":
            return await self._delete(entry, _decode(task_pb2.DeleteRequest, call))
        what = ("it has exited" if entry.stage is Stage.EXITED
                else "it is hibernated (on disk, no process): wake it first")
        raise FailedPrecondition(f"{entry.container_id}: cannot {method}: {what}")

    async def wait(self, call: Call) -> bytes:
        request = _decode(task_pb2.WaitRequest, call)
        while True:
            entry = self.entries.get(request.id)
            if entry is not None:
                if request.exec_id:
                    raise NotFound(f"{request.id}: exec {request.exec_id} does not exist: the task is hibernated")
                if entry.stage is Stage.EXITED:
                    return task_pb2.WaitResponse(exit_status=entry.exit_status,
                                                 exited_at=_stamp(entry.exited_at_ns)).SerializeToString()
                await entry.done.wait()
                continue
            epoch = self._epoch.get(request.id, 0)
            reply = await self.service.upstream.forward(call)
            if request.exec_id or self._epoch.get(request.id, 0) == epoch:
                return reply
            # The child answered because the dump ended the process: not the task's exit. Wait again.
            log.info("wait answered by the hibernate's dump; waiting on", extra={"fields": {"id": request.id}})

    def task_pid(self, container_id: str) -> int | None:
        entry = self.entries.get(container_id)
        return entry.pid if entry is not None else None

    # --- helpers ---------------------------------------------------------------------------------------

    def _state(self, entry: Hibernated, call: Call) -> bytes:
        request = _decode(task_pb2.StateRequest, call)
        if request.exec_id:
            raise NotFound(f"{entry.container_id}: exec {request.exec_id} does not exist: the task is hibernated")
        reply = task_pb2.StateResponse(id=entry.container_id, bundle=entry.bundle, pid=entry.pid,
                                       stdin=entry.stdin, stdout=entry.stdout, stderr=entry.stderr)
        if entry.stage is Stage.EXITED:
            reply.status = STOPPED
            reply.exit_status = entry.exit_status
            reply.exited_at.CopyFrom(_stamp(entry.exited_at_ns))
        else:
            reply.status = PAUSED if entry.was_paused else RUNNING
        return reply.SerializeToString()

    async def _kill(self, entry: Hibernated, request: Any) -> bytes:
        from kybernate.api import hibernate_pb2

        if request.exec_id:
            raise NotFound(f"{entry.container_id}: exec {request.exec_id} does not exist: the task is hibernated")
        if request.signal == 0 or entry.stage is Stage.EXITED:
            return task_pb2.Empty().SerializeToString()
        if request.signal not in STOP_SIGNALS:
            raise FailedPrecondition(f"{entry.container_id}: signal {request.signal} cannot be delivered: the task is "
                                     "hibernated (no process); wake it first")
        entry.stage = Stage.EXITED
        entry.exit_status = 128 + request.signal
        entry.exited_at_ns = time.time_ns()
        _release(entry.held_fds)  # the task is over: containerd's readers see the end of its output
        entry.done.set()
        log.info("hibernated task stopped without a wake", extra={"fields": {
            "id": entry.container_id, "signal": request.signal, "image": entry.image}})
        event = hibernate_pb2.TaskExit(container_id=entry.container_id, id=entry.container_id, pid=entry.pid,
                                       exit_status=entry.exit_status, exited_at=_stamp(entry.exited_at_ns))
        await self._publish(entry, events.TASK_EXIT, TASK_EXIT_TYPE, event.SerializeToString())
        return task_pb2.Empty().SerializeToString()

    async def _delete(self, entry: Hibernated, request: Any) -> bytes:
        from kybernate.api import hibernate_pb2

        if request.exec_id:
            raise NotFound(f"{entry.container_id}: exec {request.exec_id} does not exist: the task is hibernated")
        if entry.stage is not Stage.EXITED:
            raise FailedPrecondition(f"{entry.container_id}: cannot delete a hibernated task that has not been "
                                     "stopped; kill it (no wake needed) or wake it")
        self._drop_entry(entry)
        self.deleted(entry.container_id)
        await asyncio.to_thread(_remove_record, entry.bundle)
        self.service.mark_deleted(entry.bundle)
        event = hibernate_pb2.TaskDelete(container_id=entry.container_id, id=entry.container_id, pid=entry.pid,
                                         exit_status=entry.exit_status, exited_at=_stamp(entry.exited_at_ns))
        await self._publish(entry, events.TASK_DELETE, TASK_DELETE_TYPE, event.SerializeToString())
        return task_pb2.DeleteResponse(pid=entry.pid, exit_status=entry.exit_status,
                                       exited_at=_stamp(entry.exited_at_ns)).SerializeToString()

    async def _publish(self, entry: Hibernated, topic: str, type_url: str, event: bytes) -> None:
        if self.proxy is None:
            log.error("no events path to containerd: it does not learn of the stop",
                      extra={"fields": {"id": entry.container_id, "topic": topic}})
            return
        try:
            await self.proxy.publish(entry.namespace, topic, type_url, event)
        except TTRPCError as err:
            log.error("could not publish a hibernated task's event to containerd",
                      extra={"fields": {"id": entry.container_id, "topic": topic, "error": str(err)}})

    async def _delete_in_child(self, entry: Hibernated, reap: bool = True) -> None:
        """The dumped init reaped by the child (`reap`), then runc delete; its events are dropped. A restore that
        failed at Start has no process to reap (its Wait would never return): reap=False."""
        if reap and not await self._reaped(entry.container_id):
            entry.child_has_task = False  # the child does not know the task (any more)
            return
        try:
            await asyncio.wait_for(self._child_call("Delete", task_pb2.DeleteRequest(id=entry.container_id),
                                                    task_pb2.DeleteResponse), DELETE_TIMEOUT_S)
        except TTRPCError as err:
            if err.code != Code.NOT_FOUND:
                raise
        entry.child_has_task = False

    async def _reaped(self, container_id: str) -> bool:
        """Whether the child reaped the task's init (False: it has no such task). A dump that said it ended the
        task while its init still runs gets the init killed: the image is what counts now."""
        wait = task_pb2.WaitRequest(id=container_id)
        try:
            try:
                await asyncio.wait_for(self._child_call("Wait", wait, task_pb2.WaitResponse), REAP_TIMEOUT_S)
            except TimeoutError:
                log.warning("the dumped task did not exit; killing it", extra={"fields": {"id": container_id}})
                with contextlib.suppress(TTRPCError):
                    await self._child_call("Kill", task_pb2.KillRequest(id=container_id, signal=9, all=True),
                                           task_pb2.Empty)
                await asyncio.wait_for(self._child_call("Wait", wait, task_pb2.WaitResponse), REAP_TIMEOUT_S)
        except TTRPCError as err:
            if err.code != Code.NOT_FOUND:
                raise
            return False
        return True

    async def _undo_wake(self, entry: Hibernated) -> None:
        """A restore or GPU restore that failed at Start: the half-made task leaves the child again."""
        with contextlib.suppress(TTRPCError):
            await self._child_call("Kill", task_pb2.KillRequest(id=entry.container_id, signal=9, all=True),
                                   task_pb2.Empty)
        try:
            # Start's own failure path already waited for a task it had to kill; runc's failed restore left none.
            await self._delete_in_child(entry, reap=False)
        except Exception as err:
            log.error("could not remove the failed wake's task from the runc child; Wake retries that first",
                      extra={"fields": {"id": entry.container_id, "error": str(err)}})
        await self.service.gpu.forget(entry.container_id)

    async def _stats_type(self, container_id: str) -> str:
        """The metrics type the child answers Stats with (cgroup v1 or v2), to answer zeros of that type."""
        from kybernate.api import hibernate_pb2

        try:
            reply = await self._child(task_pb2.StateRequest(id=container_id), "Stats", hibernate_pb2.StatsResponse)
        except (TTRPCError, TimeoutError):
            return ""
        return reply.stats.type_url if reply.HasField("stats") else ""

    async def _child(self, request: Any, method: str, reply: Any) -> Any:
        return await asyncio.wait_for(self._child_call(method, request, reply), STATE_TIMEOUT_S)

    async def _child_call(self, method: str, request: Any, reply: Any) -> Any:
        metadata = ((NAMESPACE_KEY, self.service.namespace),)
        return await self.service.upstream.call(method, request, reply, metadata=metadata)

    def _call(self, method: str, request: Any, deadline: float | None) -> Call:
        return Call(service=self.service.upstream.service, method=method, payload=request.SerializeToString(),
                    metadata=((NAMESPACE_KEY, self.service.namespace),), timeout_nano=0, stream_id=0,
                    deadline=deadline)

    def _drop_entry(self, entry: Hibernated) -> None:
        _release(entry.held_fds)
        if self.entries.get(entry.container_id) is entry:
            del self.entries[entry.container_id]
        entry.settled.set()
        entry.done.set()
        self._update_rule()

    def _update_rule(self) -> None:
        if self.proxy is not None:
            self.proxy.drop_rule = self._drops if (self.entries or self._late_start) else None
        self.entries_changed()  # nothing passes the pass lane while a task is hibernated

    def _drops(self, topic: str, container_id: str) -> bool:
        if topic not in _TOPICS:
            return False
        entry = self.entries.get(container_id)
        if entry is not None and entry.stage is not Stage.EXITED:
            return True
        if container_id in self._late_start:
            if topic == events.TASK_START:
                self._late_start.discard(container_id)
                self._update_rule()
                return True
            if topic in (events.TASK_EXIT, events.TASK_DELETE):  # its start came before (the child's order)
                self._late_start.discard(container_id)
                self._update_rule()
        return False


def criu_stats_s(path: str, entry: int, field: int) -> float:
    """One time (microseconds in the file) of CRIU's stats image, in seconds; 0.0 when it cannot be read.

    The image: two u32 magics, a u32 size, then a StatsEntry (dump = 1, restore = 2); in the dump entry
    frozen_time is field 2, in the restore entry restore_time is field 4 (CRIU's stats.proto)."""
    try:
        with open(path, "rb") as f:
            data = f.read(4096)
        size = int.from_bytes(data[8:12], "little")
        inner = events.field_bytes(data[12:12 + size], entry)
        micros = events.varint_field(inner, field) if inner is not None else None
    except (OSError, ValueError, IndexError):
        return 0.0
    return (micros or 0) / 1e6


def _decode(kind: type[Any], call: Call) -> Any:
    try:
        return kind.FromString(call.payload)
    except Exception as err:  # protobuf's DecodeError
        raise InvalidArgument(f"{call.method}: request is not a valid {kind.__name__}") from err


def _stamp(ns: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def _empty_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and not os.listdir(path)
    except OSError:
        return False


def _owns_pid_namespace(pid: int) -> bool:
    """Whether `pid` is the init (pid 1) of its own pid namespace (the last NSpid of /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return line.split()[-1] == "1"
    except OSError:
        return False
    return False


def _hold_stdio(stdin: str, stdout: str, stderr: str) -> list[int]:
    """Open our own ends of the task's stdio fifos, so that containerd's readers (and its stdin writer) do
    not see the other end close when the child lets go of them at the dump's exit. Paths that are not fifos
    (log URIs, none) are left alone; a fifo nobody reads (ENXIO) has no reader to keep."""
    held: list[int] = []
    for path, flags in ((stdin, os.O_RDONLY), (stdout, os.O_WRONLY), (stderr, os.O_WRONLY)):
        if not path or "://" in path:
            continue
        try:
            if not stat.S_ISFIFO(os.stat(path).st_mode):
                continue
            held.append(os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as err:
            log.info("stdio fifo not held", extra={"fields": {"path": path, "error": err.strerror}})
    return held


def _open_readers(*paths: str) -> list[int]:
    """Read ends of the output fifos (a non-blocking open needs no writer), held while the child opens them."""
    fds: list[int] = []
    for path in paths:
        if not path or "://" in path:
            continue
        try:
            if stat.S_ISFIFO(os.stat(path).st_mode):
                fds.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as err:
            log.info("stdio fifo not opened for the wake", extra={"fields": {"path": path, "error": err.strerror}})
    return fds


def _release(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


def _write_record(entry: Hibernated) -> None:
    """`<bundle>/.kybernate-hibernated.json`: where the task's image is, for whoever finds it after this daemon."""
    import base64

    record = {"id": entry.container_id, "namespace": entry.namespace, "image": entry.image, "pid": entry.pid,
              "was_paused": entry.was_paused, "since": entry.since,
              "create_request": base64.b64encode(entry.create_request).decode()}
    path = os.path.join(entry.bundle, RECORD_NAME)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
    except OSError as err:
        log.warning("could not record the hibernated task in its bundle", extra={"fields": {
            "id": entry.container_id, "error": err.strerror}})


def _remove_record(bundle: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(bundle, RECORD_NAME))


def _nothing() -> None:
    pass
