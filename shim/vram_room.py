"""Room on its GPUs before a GPU task starts: what the task will hold in VRAM, asked of hookd's standby arbiter.

A task says what it will need in one of two ways: a restore at Start (its checkpoint's manifest says what it
held on each GPU) or the `kybernate.io/vram-request` annotation (bytes on each of its GPUs). hookd's arbiter
then parks idle workloads of lower or equal priority until the need fits (docs/standby.md); when it cannot,
the Start fails with FAILED_PRECONDITION before anything runs. Without an arbiter (hookd not running, or
running without --standby) the task starts as it would have, and the shim says so once.

Only containerd's Start comes here: a wake from disk starts its task through the same service call, but hookd
made its room before it asked for the wake.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gpu_steps import GpuDriver, TaskGpu

log = logging.getLogger(__name__)

START, RESTORE = "start", "restore"
ALL_GPUS = "all"
_said_no_arbiter = False


@dataclass(frozen=True, slots=True)
class RoomRequest:
    """VRAM a task will hold once started, by GPU as the task names it: a UUID (a restore: the checkpointed
    GPU), an NVML index, or "all"."""

    needs: dict[str, int]
    why: str  # start | restore


def request_for(task: TaskGpu) -> RoomRequest | None:
    """What `task` asks of the arbiter before its Start, or None: it says nothing of its VRAM."""
    from .gpu_steps import Phase

    if task.phase is Phase.RESTORE_PENDING and task.manifest is not None:
        needs: dict[str, int] = {}
        for gpu in task.manifest.gpus:
            needs[gpu.uuid] = needs.get(gpu.uuid, 0) + gpu.vram_used_bytes
        return RoomRequest({g: n for g, n in needs.items() if n > 0}, RESTORE) if any(needs.values()) else None
    if task.phase is Phase.LIVE and task.spec.vram_request:
        gpus = task.spec.gpu_targets.visible or (ALL_GPUS,)
        return RoomRequest({g: task.spec.vram_request for g in gpus}, START)
    return None


async def make_room(task: TaskGpu, driver: GpuDriver) -> None:
    """Before containerd's Start of `task`: room on its GPUs, or an error that fails the Start."""
    global _said_no_arbiter
    request = request_for(task)
    if request is None:
        return
    from kybernate.hooks.api.client import HookdUnavailable

    try:
        await driver.make_room(task.spec.namespace, task.container_id, task.spec.bundle, request, task.manifest,
                              task.spec.gpu_targets)
    except HookdUnavailable as err:
        # No arbiter on this node: the task starts as without one (a restore's own VRAM check still applies).
        if not _said_no_arbiter:
            _said_no_arbiter = True
            log.info("no standby arbiter to make room before a GPU task starts; starting it as it is",
                     extra={"fields": {"id": task.container_id, "why": request.why, "reason": err.reason}})
