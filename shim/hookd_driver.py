"""The shim's GpuDriver: kybernate-hookd over its unix socket, one client per socket for the daemon's life."""

from __future__ import annotations

from kybernate.hooks.api.client import HookdClient
from kybernate.hooks.api.model import GpuManifest


class HookdDriver:
    def __init__(self, socket_path: str, timeout_s: float) -> None:
        self._client = HookdClient(socket_path)
        self._timeout_s = timeout_s

    async def checkpoint(self, namespace: str, container_id: str, pids: list[int], lock_timeout_ms: int) -> GpuManifest:
        return await self._client.checkpoint_gpu(
            namespace, container_id, pids, lock_timeout_ms=lock_timeout_ms, deadline_s=self._timeout_s
        )

    async def restore(
        self, namespace: str, container_id: str, pids: list[int], manifest: GpuManifest | None
    ) -> None:
        await self._client.restore_gpu(namespace, container_id, pids, manifest=manifest, deadline_s=self._timeout_s)
