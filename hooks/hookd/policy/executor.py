"""Park and wake: containerd's Tasks.Pause and Tasks.Resume of the workload's task (tier ram), or a hibernate
into hookd's store and a wake from it (tier disk, through our shim: docs/standby.md), timed.

A park is a containerd Pause, so our shim does what it does for every Pause: the GPU state goes to host RAM
(lock + checkpoint, with rollback), then the cgroup is frozen; containerd and the kubelet see PAUSED, which
is the truth. A wake is a Resume: thaw, then the GPU state comes back (with the VRAM pre-check). A failed
Pause leaves the task running (the shim's rule); a failed Resume leaves it paused with its GPU state in host
RAM, which containerd also shows, and the controller tries the wake again. The containerd client is
blocking: each call runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kybernate.hooks.api.errors import Code, KybernateError
from kybernate.hooks.containerd.client import ContainerdClient, ContainerdError

if TYPE_CHECKING:
    from ..store.checkpoints import StoreCheckpoints


class UnknownWorkload(KybernateError):
    """No GPU workload of that name is known to hookd (no intent file with a live task)."""

    code = Code.NOT_FOUND


class StandbyFailed(KybernateError):
    """A park or wake failed; the message has containerd's (and so the shim's) reason."""

    code = Code.ABORTED


class StandbyRefused(KybernateError):
    """A park or wake cannot be done now (not running, already parked, no room on the GPU); nothing changed."""

    code = Code.FAILED_PRECONDITION


@dataclass(frozen=True, slots=True)
class Hibernated:
    key: str
    generation: int
    seconds: float  # the whole hibernate: dump, rootfs diff, manifest


class Executor:
    """Calls containerd; one client per call (each call is seconds long; a connection is cheap). The disk tier
    goes through hookd's store (`store`): a hibernate is a store checkpoint, a wake restores from it."""

    def __init__(self, address: str, timeout_s: float, store: StoreCheckpoints | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.store = store

    async def hibernate(self, namespace: str, container_id: str) -> Hibernated:
        """Into the store as a complete generation of the workload's key; the task stays containerd's."""
        from ..store.checkpoint import CheckpointRequest

        store = self._store()
        request = CheckpointRequest(namespace, container_id, key="", leave_running=False, deadline_s=self.timeout_s,
                                    reason="hibernate", hibernate=True)
        try:
            result = await store.checkpoint(request, lambda progress: None)
        except KybernateError as err:
            if err.code == Code.FAILED_PRECONDITION:
                raise StandbyRefused(f"hibernate of {namespace}/{container_id}: {err.message}") from err
            raise StandbyFailed(f"hibernate of {namespace}/{container_id} failed: {err.message}") from err
        return Hibernated(result.key, result.generation, result.total_s)

    async def wake_from_disk(self, namespace: str, container_id: str, bundle: str, key: str, generation: int) -> float:
        from ..store.hibernate import wake_from_store

        store = self._store()
        try:
            spec = await asyncio.to_thread(_read_spec, bundle)
            woken = await wake_from_store(store.store, store.executor, self.address, namespace, container_id, spec,
                                          key, generation, self.timeout_s)
        except OSError as err:
            raise StandbyFailed(f"wake of {namespace}/{container_id}: cannot read its spec in {bundle}: {err}") from err
        except KybernateError as err:
            raise StandbyFailed(err.message) from err
        return woken.total_s

    def _store(self) -> StoreCheckpoints:
        if self.store is None:
            raise StandbyRefused("the disk tier needs hookd's store, which this executor was not given")
        return self.store

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


def _read_spec(bundle: str) -> dict[str, Any]:
    with open(os.path.join(bundle, "config.json"), "rb") as f:
        spec = json.load(f)
    if not isinstance(spec, dict):
        raise OSError(f"{bundle}/config.json is not an OCI spec")
    return spec
