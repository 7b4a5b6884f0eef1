"""Where GPU state goes at each task step: the per-container GPU lifecycle as a transition table.

The order is what matters: the CUDA driver cannot lock a process whose cgroup is frozen, and CRIU
cannot dump a process that still has GPU mappings. So the GPU is checkpointed (VRAM -> host memory)
before the pause that precedes every checkpoint, and restored only after the task runs again
(resume, or runc's restore at Start).

Containers that are not GPU containers never reach the driver and never need kybernate-hookd.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .runtime_options import KybernateOptions

if TYPE_CHECKING:
    # The manifest's dataclasses cost ~15 ms to define: the daemon's import (on the start path) skips them;
    # only a checkpoint or a restore loads them.
    from kybernate.hooks.api.model import GpuManifest

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "kybernate.io/"


class GpuStepError(Exception):
    """A GPU step failed; the task was left as it was before the step."""


class Phase(enum.Enum):
    NO_GPU = "no-gpu"  # not a GPU container: every step is a no-op
    LIVE = "live"  # GPU state is on the GPU (or the container has no CUDA process yet)
    CHECKPOINTED = "checkpointed"  # VRAM moved to host memory, CUDA processes locked
    RESTORE_PENDING = "restore-pending"  # created from a checkpoint; GPU restore follows runc's restore


class Event(enum.Enum):
    PAUSE = "pause"
    PAUSE_FAILED = "pause-failed"
    RESUME = "resume"
    CHECKPOINT = "checkpoint"
    CHECKPOINT_FAILED = "checkpoint-failed"
    CHECKPOINT_DONE = "checkpoint-done"
    START = "start"


# (phase, event) -> what the GPU must do. A pair missing here is a no-op for the GPU.
TRANSITIONS: dict[tuple[Phase, Event], str] = {
    (Phase.LIVE, Event.PAUSE): "checkpoint_gpu",  # hot standby, and the lock must precede the freeze
    (Phase.CHECKPOINTED, Event.PAUSE_FAILED): "restore_gpu",
    (Phase.CHECKPOINTED, Event.RESUME): "restore_gpu",
    (Phase.LIVE, Event.CHECKPOINT): "checkpoint_gpu",  # a pause that kept VRAM, or no pause at all
    (Phase.CHECKPOINTED, Event.CHECKPOINT_FAILED): "restore_gpu_unless_paused",
    (Phase.CHECKPOINTED, Event.CHECKPOINT_DONE): "restore_gpu_unless_paused",
    (Phase.RESTORE_PENDING, Event.START): "restore_gpu",
}


class GpuDriver(Protocol):
    """The node daemon's view for one task: implemented by the kybernate-hookd client."""

    async def checkpoint(self, namespace: str, container_id: str, pids: list[int], lock_timeout_ms: int) -> GpuManifest:
        """Lock and checkpoint every CUDA process; returns the GPU manifest. Rolls back on failure."""
        ...

    async def restore(
        self, namespace: str, container_id: str, pids: list[int], manifest: GpuManifest | None
    ) -> None:
        """Restore (remapping GPUs if they differ from the manifest) and unlock every CUDA process."""
        ...


@dataclass
class TaskGpu:
    """One task's GPU bookkeeping. Only the shim's event loop touches it."""

    container_id: str
    namespace: str
    bundle: str
    options: KybernateOptions
    phase: Phase
    paused: bool = False
    manifest: GpuManifest | None = None


@dataclass
class TaskControl:
    """What the GPU steps need from the task service: the task's pids and freeze control."""

    pids: Callable[[str], Awaitable[list[int]]]
    freeze: Callable[[str], Awaitable[None]]
    thaw: Callable[[str], Awaitable[None]]


def is_gpu_container(spec: dict[str, Any]) -> bool:
    """A GPU container: NVIDIA devices in the spec, NVIDIA_VISIBLE_DEVICES set, or opted in by annotation."""
    notes = spec.get("annotations") or {}
    flag = str(notes.get(ANNOTATION_PREFIX + "gpu", "")).lower()
    if flag in ("true", "false"):
        return flag == "true"
    devices = ((spec.get("linux") or {}).get("devices")) or []
    if any(str(d.get("path", "")).startswith("/dev/nvidia") for d in devices if isinstance(d, dict)):
        return True
    for entry in (spec.get("process") or {}).get("env") or []:
        name, _, value = str(entry).partition("=")
        if name == "NVIDIA_VISIBLE_DEVICES" and value not in ("", "void", "none"):
            return True
    return False


def options_with_annotations(base: KybernateOptions, spec: dict[str, Any]) -> KybernateOptions:
    """Per-pod overrides: `kybernate.io/lock-timeout-ms`, `kybernate.io/pause-releases-vram`."""
    from dataclasses import replace

    notes = spec.get("annotations") or {}
    changes: dict[str, Any] = {}
    raw = notes.get(ANNOTATION_PREFIX + "lock-timeout-ms")
    if raw is not None:
        if not str(raw).isdigit() or not 0 < int(raw) <= 3_600_000:
            raise GpuStepError(f"annotation {ANNOTATION_PREFIX}lock-timeout-ms={raw!r}: want milliseconds, 1..3600000")
        changes["lock_timeout_ms"] = int(raw)
    raw = notes.get(ANNOTATION_PREFIX + "pause-releases-vram")
    if raw is not None:
        if str(raw).lower() not in ("true", "false"):
            raise GpuStepError(f"annotation {ANNOTATION_PREFIX}pause-releases-vram={raw!r}: want true or false")
        changes["pause_releases_vram"] = str(raw).lower() == "true"
    return replace(base, **changes) if changes else base


def read_manifest(checkpoint_dir: str) -> GpuManifest | None:
    from kybernate.hooks.api import manifest as manifest_file
    from kybernate.hooks.api.model import ManifestError

    try:
        return manifest_file.read_manifest(checkpoint_dir)
    except ManifestError as err:
        raise GpuStepError(str(err)) from err


def write_manifest(checkpoint_dir: str, manifest: GpuManifest) -> None:
    from kybernate.hooks.api import manifest as manifest_file

    manifest_file.write_manifest(checkpoint_dir, manifest)


@dataclass
class GpuSteps:
    """Runs the transition table for every task of this shim."""

    control: TaskControl
    driver_for: Callable[[KybernateOptions], GpuDriver]
    tasks: dict[str, TaskGpu] = field(default_factory=dict)

    def created(self, task: TaskGpu) -> None:
        self.tasks[task.container_id] = task

    def forget(self, container_id: str) -> None:
        self.tasks.pop(container_id, None)

    def phase(self, container_id: str) -> Phase:
        task = self.tasks.get(container_id)
        return task.phase if task else Phase.NO_GPU

    async def on(self, event: Event, container_id: str) -> None:
        task = self.tasks.get(container_id)
        if task is None or task.phase is Phase.NO_GPU:
            return
        if event is Event.PAUSE and not task.options.pause_releases_vram:
            return
        action = TRANSITIONS.get((task.phase, event))
        log.debug("gpu step", extra={"fields": {"id": container_id, "phase": task.phase.value,
                                                  "event": event.value, "action": action or "none"}})
        if action == "checkpoint_gpu":
            await self._checkpoint(task, thaw_first=event is Event.CHECKPOINT and task.paused)
        elif action == "restore_gpu":
            await self._restore(task)
        elif action == "restore_gpu_unless_paused" and not task.paused:
            await self._restore(task)

    async def _checkpoint(self, task: TaskGpu, thaw_first: bool) -> None:
        # A frozen cgroup cannot be locked: thaw for the GPU step, freeze again before CRIU runs.
        if thaw_first:
            await self.control.thaw(task.container_id)
        try:
            pids = await self.control.pids(task.container_id)
            task.manifest = await self.driver_for(task.options).checkpoint(
                task.namespace, task.container_id, pids, task.options.lock_timeout_ms
            )
            task.phase = Phase.CHECKPOINTED
        finally:
            if thaw_first:
                await self.control.freeze(task.container_id)

    async def _restore(self, task: TaskGpu) -> None:
        pids = await self.control.pids(task.container_id)
        await self.driver_for(task.options).restore(task.namespace, task.container_id, pids, task.manifest)
        task.phase = Phase.LIVE
