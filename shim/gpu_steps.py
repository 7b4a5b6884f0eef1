"""Where GPU state goes at each task step: the per-container GPU lifecycle as one complete table.

The order is what matters: the CUDA driver cannot lock a process whose cgroup is frozen, and CRIU
cannot dump a process that still has GPU mappings. So the GPU is checkpointed (VRAM -> host memory)
before the pause that precedes every checkpoint, and restored only after the task runs again
(resume, or runc's restore at Start).

TABLE maps every (phase, event, guard) to a Step (action, next phase) or an explicit Reject; the
guards are whether the task's cgroup is frozen when the event fires (`paused`) and whether a plain
pause moves VRAM to host memory (`release`). Before each step the desired GPU state and the action
are written to the task's intent file (hooks/api/intent.py) so that a crash in the middle of the step is
reconciled afterwards, by this shim on the task's next call or by kybernate-hookd (docs/lifecycle.md).

Containers that are not GPU containers never reach the driver and never need kybernate-hookd.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kybernate.hooks.api import intent, procfs

from .errors import FailedPrecondition, Internal, InvalidArgument
from .runtime_options import KybernateOptions
from .taskspec import TaskSpec

if TYPE_CHECKING:
    # The manifest's dataclasses cost ~15 ms to define: the daemon's import (on the start path) skips them;
    # only a checkpoint or a restore loads them.
    from kybernate.hooks.api.model import GpuManifest

    from .gpu_map import GpuTargets
    from .vram_room import RoomRequest

log = logging.getLogger(__name__)



def _own_start_time() -> int:
    """This daemon's start time, recorded with its pid so hookd can tell it from a later process of that pid."""
    return procfs.start_time(os.getpid())


class GpuStepError(FailedPrecondition):
    """A GPU step cannot run or failed; the message says what to do."""


class Phase(enum.Enum):
    NO_GPU = "no-gpu"  # not a GPU container: every step is a no-op
    LIVE = "live"  # GPU state is on the GPU (or the container has no CUDA process yet)
    PARKED = "parked"  # paused with VRAM in host memory (hot standby)
    DUMPING = "dumping"  # VRAM in host memory for a CRIU dump in progress
    RESTORE_PENDING = "restore-pending"  # created from a checkpoint; GPU restore follows runc's restore
    UNKNOWN = "unknown"  # a GPU step failed midway: the driver's state is unknown until the next step


class Event(enum.Enum):
    START = "start"  # runc started (or restored) the task
    PAUSE = "pause"  # before the freeze
    PAUSE_FAILED = "pause-failed"  # the freeze failed
    RESUME = "resume"  # after the thaw
    CHECKPOINT = "checkpoint"  # before CRIU's dump
    CHECKPOINT_FAILED = "checkpoint-failed"  # CRIU failed; the task runs on (or stays paused)
    CHECKPOINT_DONE = "checkpoint-done"  # CRIU dumped and the task runs on (or stays paused)
    CHECKPOINT_EXIT = "checkpoint-exit"  # CRIU dumped and ended the task
    RECONCILE = "reconcile"  # containerd (re)connected: settle a task whose last step failed


class Action(enum.Enum):
    NOTHING = "nothing"
    CHECKPOINT = "checkpoint"  # lock + checkpoint every CUDA process (idempotent from any state)
    THAW_CHECKPOINT_FREEZE = "thaw-checkpoint-freeze"  # a frozen cgroup cannot be locked
    RESTORE = "restore"  # restore + unlock every CUDA process (idempotent from any state)


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    next: Phase


@dataclass(frozen=True, slots=True)
class Reject:
    """This event cannot happen in this phase; the shim answers FAILED_PRECONDITION and changes nothing."""

    why: str


Rule = Step | Reject
# The GPU state each phase stands for, as the intent file records it.
DESIRED: dict[Phase, str] = {
    Phase.NO_GPU: intent.RUNNING, Phase.LIVE: intent.RUNNING, Phase.PARKED: intent.PARKED,
    Phase.DUMPING: intent.DUMP, Phase.RESTORE_PENDING: intent.RUNNING, Phase.UNKNOWN: intent.RUNNING,
}


def _build() -> dict[tuple[Phase, Event, bool, bool], Rule]:
    """Every (phase, event, paused, release) combination, spelled out phase by phase."""
    t: dict[tuple[Phase, Event, bool, bool], Rule] = {}
    s, n = Step, Action.NOTHING

    def put(phase: Phase, event: Event, rule: Rule, paused: bool | None = None, release: bool | None = None) -> None:
        for p in (False, True) if paused is None else (paused,):
            for r in (False, True) if release is None else (release,):
                t[(phase, event, p, r)] = rule

    never_frozen = Reject("the shim fires this event only after thawing the task")
    for e in Event:
        put(Phase.NO_GPU, e, s(n, Phase.NO_GPU))

    put(Phase.LIVE, Event.START, s(n, Phase.LIVE))
    for phase in (Phase.LIVE, Phase.PARKED, Phase.DUMPING, Phase.RESTORE_PENDING):
        put(phase, Event.RECONCILE, s(n, phase))  # known states: nothing to settle
    put(Phase.LIVE, Event.PAUSE, s(Action.CHECKPOINT, Phase.PARKED), paused=False, release=True)
    put(Phase.LIVE, Event.PAUSE, s(n, Phase.LIVE), paused=False, release=False)  # VRAM stays: a plain freeze
    put(Phase.LIVE, Event.PAUSE, s(n, Phase.LIVE), paused=True)  # already frozen: runc answers
    put(Phase.LIVE, Event.PAUSE_FAILED, s(n, Phase.LIVE))
    put(Phase.LIVE, Event.RESUME, s(n, Phase.LIVE), paused=False)
    put(Phase.LIVE, Event.RESUME, never_frozen, paused=True)
    put(Phase.LIVE, Event.CHECKPOINT, s(Action.CHECKPOINT, Phase.DUMPING), paused=False)
    put(Phase.LIVE, Event.CHECKPOINT, s(Action.THAW_CHECKPOINT_FREEZE, Phase.DUMPING), paused=True)
    for e in (Event.CHECKPOINT_FAILED, Event.CHECKPOINT_DONE, Event.CHECKPOINT_EXIT):
        put(Phase.LIVE, e, s(n, Phase.LIVE))  # the GPU never moved (no CUDA process, or a no-op step)

    not_started = Reject("the task was created from a checkpoint and has not been started")
    put(Phase.RESTORE_PENDING, Event.START, s(Action.RESTORE, Phase.LIVE), paused=False)
    put(Phase.RESTORE_PENDING, Event.START, never_frozen, paused=True)
    for e in set(Event) - {Event.START, Event.RECONCILE}:
        put(Phase.RESTORE_PENDING, e, not_started)

    started = Reject("the task has already been started")
    no_dump = Reject("no checkpoint is in progress")
    put(Phase.PARKED, Event.START, started)
    put(Phase.PARKED, Event.PAUSE, s(n, Phase.PARKED))  # parked already
    put(Phase.PARKED, Event.PAUSE_FAILED, s(Action.RESTORE, Phase.LIVE), paused=False)
    put(Phase.PARKED, Event.PAUSE_FAILED, s(n, Phase.PARKED), paused=True)
    put(Phase.PARKED, Event.RESUME, s(Action.RESTORE, Phase.LIVE), paused=False)
    put(Phase.PARKED, Event.RESUME, never_frozen, paused=True)
    put(Phase.PARKED, Event.CHECKPOINT, s(n, Phase.DUMPING))  # VRAM is in host memory already
    for e in (Event.CHECKPOINT_FAILED, Event.CHECKPOINT_DONE, Event.CHECKPOINT_EXIT):
        put(Phase.PARKED, e, no_dump)

    busy = Reject("a checkpoint of this task is in progress")
    put(Phase.DUMPING, Event.START, started)
    for e in (Event.PAUSE, Event.PAUSE_FAILED, Event.RESUME, Event.CHECKPOINT):
        put(Phase.DUMPING, e, busy)
    for e in (Event.CHECKPOINT_FAILED, Event.CHECKPOINT_DONE):
        put(Phase.DUMPING, e, s(Action.RESTORE, Phase.LIVE), paused=False)
        put(Phase.DUMPING, e, s(n, Phase.PARKED), paused=True)  # the task stays paused: parked until Resume
    put(Phase.DUMPING, Event.CHECKPOINT_EXIT, s(n, Phase.DUMPING))  # the task is gone

    # UNKNOWN: the driver may have the processes RUNNING, LOCKED or CHECKPOINTED. Both driver steps are
    # idempotent from any of those, so the next event simply runs the step that reaches its target.
    put(Phase.UNKNOWN, Event.START, started)
    put(Phase.UNKNOWN, Event.PAUSE, s(Action.CHECKPOINT, Phase.PARKED), paused=False, release=True)
    put(Phase.UNKNOWN, Event.PAUSE, s(Action.RESTORE, Phase.LIVE), paused=False, release=False)
    put(Phase.UNKNOWN, Event.PAUSE, s(n, Phase.UNKNOWN), paused=True)
    put(Phase.UNKNOWN, Event.PAUSE_FAILED, s(Action.RESTORE, Phase.LIVE), paused=False)
    put(Phase.UNKNOWN, Event.PAUSE_FAILED, s(n, Phase.UNKNOWN), paused=True)
    put(Phase.UNKNOWN, Event.RESUME, s(Action.RESTORE, Phase.LIVE), paused=False)
    put(Phase.UNKNOWN, Event.RESUME, never_frozen, paused=True)
    put(Phase.UNKNOWN, Event.CHECKPOINT, s(Action.CHECKPOINT, Phase.DUMPING), paused=False)
    put(Phase.UNKNOWN, Event.CHECKPOINT, s(Action.THAW_CHECKPOINT_FREEZE, Phase.DUMPING), paused=True)
    put(Phase.UNKNOWN, Event.CHECKPOINT_FAILED, no_dump)
    put(Phase.UNKNOWN, Event.CHECKPOINT_DONE, no_dump)
    put(Phase.UNKNOWN, Event.CHECKPOINT_EXIT, no_dump)
    put(Phase.UNKNOWN, Event.RECONCILE, s(Action.RESTORE, Phase.LIVE), paused=False)
    put(Phase.UNKNOWN, Event.RECONCILE, s(n, Phase.UNKNOWN), paused=True)  # frozen: the driver cannot reach it
    return t


TABLE = _build()
ALL_KEYS = tuple(itertools.product(Phase, Event, (False, True), (False, True)))


def rule(phase: Phase, event: Event, paused: bool, release: bool) -> Rule:
    try:
        return TABLE[(phase, event, paused, release)]
    except KeyError:  # the table is complete (unit-tested); reaching this is a bug
        raise Internal(f"GPU lifecycle has no rule for {phase.value}/{event.value}") from None


class GpuDriver(Protocol):
    """The node daemon's view for one task: implemented by the kybernate-hookd client."""

    async def checkpoint(self, namespace: str, container_id: str, pids: list[int], lock_timeout_ms: int) -> GpuManifest:
        """Lock and checkpoint every CUDA process; returns the GPU manifest. Rolls back on failure."""
        ...

    async def restore(
        self, namespace: str, container_id: str, pids: list[int], manifest: GpuManifest | None,
        targets: GpuTargets | None = None,
    ) -> None:
        """Restore (remapping GPUs if they differ from the manifest, onto `targets`: the container's own GPUs
        or its gpu-map annotation) and unlock every CUDA process."""
        ...

    async def make_room(self, namespace: str, container_id: str, bundle: str, request: RoomRequest,
                        manifest: GpuManifest | None, targets: GpuTargets) -> None:
        """Before the task starts: hookd's standby arbiter makes room for it on its GPUs (shim/vram_room.py)."""
        ...


@dataclass
class TaskGpu:
    """One task's GPU bookkeeping. Only the shim's event loop touches it."""

    spec: TaskSpec
    phase: Phase
    paused: bool = False
    manifest: GpuManifest | None = None
    init_pid: int = 0
    pids: tuple[int, ...] = ()

    @property
    def container_id(self) -> str:
        return self.spec.container_id

    @property
    def options(self) -> KybernateOptions:
        return self.spec.options


@dataclass
class TaskControl:
    """What the GPU steps need from the task service: the task's pids and freeze control."""

    pids: Callable[[str], Awaitable[list[int]]]
    freeze: Callable[[str], Awaitable[None]]
    thaw: Callable[[str], Awaitable[None]]


def read_manifest(checkpoint_dir: str) -> GpuManifest | None:
    """The checkpoint's GPU manifest, checked against its schema (wrong types fail here, at Create, not at
    Start); None when there is none."""
    from kybernate.hooks.api import manifest as manifest_file
    from kybernate.hooks.api.model import ManifestError

    try:
        return manifest_file.read_manifest(checkpoint_dir)
    except ManifestError as err:
        raise InvalidArgument(f"GPU manifest is malformed: {err}; nothing was created") from err
    except OSError as err:
        raise GpuStepError(f"the GPU manifest in {checkpoint_dir} cannot be read: {err}") from err


def write_manifest(checkpoint_dir: str, manifest: GpuManifest) -> None:
    from kybernate.hooks.api import manifest as manifest_file

    try:
        manifest_file.write_manifest(checkpoint_dir, manifest)
    except OSError as err:
        raise GpuStepError(f"cannot write the GPU manifest into {checkpoint_dir}: {err}") from err


@dataclass
class GpuSteps:
    """Runs the lifecycle table for every task of this shim, recording intent before each step."""

    control: TaskControl
    driver_for: Callable[[KybernateOptions], GpuDriver]
    tasks: dict[str, TaskGpu] = field(default_factory=dict)

    async def created(self, task: TaskGpu) -> None:
        self.tasks[task.container_id] = task
        if task.phase is not Phase.NO_GPU:
            await self._record(task, task.phase, None)

    async def forget(self, container_id: str) -> None:
        task = self.tasks.pop(container_id, None)
        if task is not None and task.phase is not Phase.NO_GPU:
            await asyncio.to_thread(intent.remove, task.options.intent_dir, task.spec.namespace, container_id)

    def has_gpu_tasks(self) -> bool:
        """Whether any task of this shim has GPU state to step (or reconcile)."""
        return any(task.phase is not Phase.NO_GPU for task in self.tasks.values())

    def phase(self, container_id: str) -> Phase:
        task = self.tasks.get(container_id)
        return task.phase if task else Phase.NO_GPU

    async def started(self, container_id: str, pid: int) -> None:
        task = self.tasks.get(container_id)
        if task is not None and task.phase is not Phase.NO_GPU:
            task.init_pid = pid  # hookd's reconciler finds every process of the task through its cgroup
            await self._record(task, task.phase, None)

    async def refrozen(self, container_id: str) -> None:
        """The service froze the task again after a failed GPU restore: parked until the next Resume."""
        task = self.tasks.get(container_id)
        if task is not None and task.phase is not Phase.NO_GPU:
            task.paused = True
            task.phase = Phase.PARKED
            await _quietly(self._record(task, Phase.PARKED, None))

    async def reconcile(self) -> None:
        """After (re)connecting: drive every task whose last step failed back to a known state, if it runs."""
        for task in list(self.tasks.values()):
            if task.phase is Phase.UNKNOWN:
                try:
                    await self.on(Event.RECONCILE, task.container_id)
                except Exception as err:
                    log.warning("reconcile failed; the next call or hookd retries",
                                extra={"fields": {"id": task.container_id, "error": str(err)}})

    async def on(self, event: Event, container_id: str) -> None:
        """Run the event's step. On failure the phase becomes UNKNOWN (the driver may be anywhere) and the
        intent says so; the next event, or hookd's reconciler, drives it to a known state."""
        task = self.tasks.get(container_id)
        if task is None or task.phase is Phase.NO_GPU:
            return
        found = rule(task.phase, event, task.paused, task.options.pause_releases_vram)
        log.debug("gpu step", extra={"fields": {"id": container_id, "phase": task.phase.value, "event": event.value,
                                                  "paused": task.paused, "rule": _describe(found)}})
        if isinstance(found, Reject):
            raise GpuStepError(f"GPU lifecycle: {event.value} in phase {task.phase.value}: {found.why}")
        if found.action is Action.NOTHING:
            if found.next is not task.phase:
                task.phase = found.next
                await self._record(task, found.next, None)
            return
        await self._record(task, found.next, found.action.value)
        try:
            if found.action is Action.RESTORE:
                await self._restore(task)
            else:
                await self._checkpoint(task, thaw_first=found.action is Action.THAW_CHECKPOINT_FREEZE)
        except BaseException as err:
            # The driver may have the processes anywhere between the two ends of the step, unless the
            # request never reached hookd: then the phase is what it was.
            before = task.phase
            task.phase = before if getattr(err, "nothing_sent", False) else Phase.UNKNOWN
            await _quietly(self._record(task, task.phase, None))
            raise
        task.phase = found.next
        await self._record(task, found.next, None)

    async def _checkpoint(self, task: TaskGpu, thaw_first: bool) -> None:
        # A frozen cgroup cannot be locked: thaw for the GPU step, freeze again before CRIU runs.
        if thaw_first:
            await self.control.thaw(task.container_id)
        try:
            task.pids = tuple(await self.control.pids(task.container_id))
            task.manifest = await self.driver_for(task.options).checkpoint(
                task.spec.namespace, task.container_id, list(task.pids), task.options.lock_timeout_ms
            )
        finally:
            if thaw_first:
                await self.control.freeze(task.container_id)

    async def _restore(self, task: TaskGpu) -> None:
        task.pids = tuple(await self.control.pids(task.container_id))
        if not task.pids and task.init_pid:
            # runc lists a container's processes from its cgroup: none there means the restore put them
            # elsewhere (criu_config.restore_cgroup_root says when). Their GPU state must come back all the
            # same: the restored init and its descendants are the task's processes.
            task.pids = tuple(await asyncio.to_thread(procfs.process_tree, task.init_pid))
            log.warning("runc lists no process in the restored task's cgroup; restoring the GPU state of its "
                        "init process and descendants", extra={"fields": {"id": task.container_id,
                                                                          "pids": list(task.pids)}})
        await self.driver_for(task.options).restore(task.spec.namespace, task.container_id, list(task.pids),
                                                    task.manifest, task.spec.gpu_targets)

    async def _record(self, task: TaskGpu, phase: Phase, step: str | None) -> None:
        record = intent.Intent(
            namespace=task.spec.namespace, container_id=task.container_id, bundle=task.spec.bundle,
            desired=DESIRED[phase], step=step, phase=phase.value, shim_pid=os.getpid(), shim_start=_own_start_time(),
            init_pid=task.init_pid,
            pids=task.pids, manifest=task.manifest.to_dict() if task.manifest is not None else None,
        )
        try:
            await asyncio.to_thread(intent.write, task.options.intent_dir, record)
        except OSError as err:
            # Without the record a crash in this step could strand GPU state: do not take the step.
            raise GpuStepError(f"cannot record the GPU intent in {task.options.intent_dir}: {err}; "
                               "nothing was changed") from err


async def _quietly(work: Awaitable[None]) -> None:
    try:
        await work
    except Exception as err:  # already failing: the original error is the one to report
        log.warning("could not record the failed step", extra={"fields": {"error": str(err)}})


def _describe(found: Rule) -> str:
    return found.why if isinstance(found, Reject) else f"{found.action.value}->{found.next.value}"
