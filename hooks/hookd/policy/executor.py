"""Park and wake: containerd's Tasks.Pause and Tasks.Resume of the workload's task, timed.

A park is a containerd Pause, so our shim does what it does for every Pause: the GPU state goes to host RAM
(lock + checkpoint, with rollback), then the cgroup is frozen; containerd and the kubelet see PAUSED, which
is the truth. A wake is a Resume: thaw, then the GPU state comes back (with the VRAM pre-check). A failed
Pause leaves the task running (the shim's rule); a failed Resume leaves it paused with its GPU state in host
RAM, which containerd also shows, and the controller tries the wake again. The containerd client is
blocking: each call runs in a thread.
"""

from __future__ import annotations

import asyncio
import time

from kybernate.hooks.api.errors import Code, KybernateError
from kybernate.hooks.containerd.client import ContainerdClient, ContainerdError


class UnknownWorkload(KybernateError):
    """No GPU workload of that name is known to hookd (no intent file with a live task)."""

    code = Code.NOT_FOUND


class StandbyFailed(KybernateError):
    """A park or wake failed; the message has containerd's (and so the shim's) reason."""

    code = Code.ABORTED


class StandbyRefused(KybernateError):
    """A park or wake cannot be done now (not running, already parked, no room on the GPU); nothing changed."""

    code = Code.FAILED_PRECONDITION


class Executor:
    """Calls containerd; one client per call (each call is seconds long; a connection is cheap)."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s

    async def pause(self, namespace: str, container_id: str) -> float:
        return await self._timed(namespace, container_id, "pause")

    async def resume(self, namespace: str, container_id: str) -> float:
        return await self._timed(namespace, container_id, "resume")

    async def status(self, namespace: str, container_id: str) -> str:
        def call() -> str:
            with ContainerdClient(self.address, namespace, timeout=30.0) as client:
                return client.task_status(container_id)

        try:
            return await asyncio.to_thread(call)
        except ContainerdError as err:
            return "UNKNOWN" if not err.not_found else "NOT_FOUND"

    async def _timed(self, namespace: str, container_id: str, verb: str) -> float:
        def call() -> float:
            with ContainerdClient(self.address, namespace, timeout=self.timeout_s) as client:
                start = time.monotonic()
                getattr(client, verb)(container_id)
                return time.monotonic() - start

        try:
            return await asyncio.to_thread(call)
        except ContainerdError as err:
            raise StandbyFailed(f"{verb} of {namespace}/{container_id} failed: {err.details or err}") from err
