"""Typed async client of kybernate-hookd, for the shim.

Importing this module is cheap (standard library only): grpc and the generated code load on the
first call, because the shim's start path is latency-sensitive and most containers never need hookd.

    client = HookdClient("/run/kybernate/hookd.sock")
    manifest = await client.checkpoint_gpu("k8s.io", cid, pids, lock_timeout_ms=10_000, deadline_s=600)
    write_manifest(checkpoint_dir, manifest)
    ...
    result = await client.restore_gpu("k8s.io", cid, new_pids, manifest=read_manifest(checkpoint_dir))

Errors: HookdUnavailable when nothing answers on the socket; HookdError(code, message) for every
status hookd returns (code is the gRPC/ttrpc number: pass it through to containerd as is).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from . import DEFAULT_SOCKET
from .errors import METADATA_DRIVER_ERROR, METADATA_PID, METADATA_STEP
from .manifest import MANIFEST_FILE
from .model import (
    CheckpointResult,
    GpuDeviceRecord,
    GpuManifest,
    GpuPair,
    GpuProcessRecord,
    HealthInfo,
    ManifestError,
    NodeGpu,
    ProcessOutcome,
    ProcessStatus,
    RestoreResult,
    StepTiming,
)

__all__ = [
    "DEFAULT_SOCKET", "MANIFEST_FILE", "CheckpointResult", "GpuDeviceRecord", "GpuManifest", "GpuPair",
    "GpuProcessRecord", "HealthInfo", "HookdClient", "HookdError", "HookdUnavailable", "ManifestError", "NodeGpu",
    "ProcessOutcome", "ProcessStatus", "RestoreResult", "StepTiming",
]

_CODE_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
               6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
               10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
               15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


class HookdUnavailable(Exception):
    """Nothing answers on hookd's socket."""

    def __init__(self, socket_path: str, reason: str = "") -> None:
        super().__init__(f"kybernate-hookd is not reachable at {socket_path}: start it "
                         "(systemctl start kybernate-hookd)" + (f" [{reason}]" if reason else ""))
        self.socket_path = socket_path
        self.reason = reason


class HookdError(Exception):
    """hookd answered with an error status. `code` is the google.rpc.Code number (9 = FAILED_PRECONDITION).

    When a driver step failed: `pid`, `step` (lock|checkpoint|restore|unlock|get_state) and
    `driver_error` (e.g. CUDA_ERROR_TIMEOUT) say where.
    """

    def __init__(self, code: int, message: str, *, pid: int | None = None, step: str | None = None,
                 driver_error: str | None = None) -> None:
        super().__init__(f"{_CODE_NAMES.get(code, code)}: {message}")
        self.code = code
        self.message = message
        self.pid = pid
        self.step = step
        self.driver_error = driver_error

    @property
    def code_name(self) -> str:
        return _CODE_NAMES.get(self.code, str(self.code))


class HookdClient:
    """One connection to hookd, opened on first use and reused; bound to the event loop that first uses it."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET) -> None:
        self.socket_path = socket_path
        self._channel: Any = None
        self._stub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def checkpoint_gpu(self, namespace: str, container_id: str, pids: Sequence[int], lock_timeout_ms: int = 0,
                             deadline_s: float = 600.0, *, cgroup_path: str = "") -> GpuManifest:
        """Lock + checkpoint every CUDA process of the container (all or nothing). An empty manifest
        (`manifest.empty`) means the container has no CUDA process."""
        return (await self.checkpoint_gpu_detailed(namespace, container_id, pids, lock_timeout_ms, deadline_s,
                                                   cgroup_path=cgroup_path)).manifest

    async def checkpoint_gpu_detailed(self, namespace: str, container_id: str, pids: Sequence[int],
                                      lock_timeout_ms: int = 0, deadline_s: float = 600.0, *,
                                      cgroup_path: str = "") -> CheckpointResult:
        """checkpoint_gpu, plus what happened to each process and how long each step took."""
        from kybernate.api import hookd_pb2 as pb

        from . import convert

        request = pb.CheckpointGpuRequest(container=_ref(pb, namespace, container_id, pids, cgroup_path),
                                          lock_timeout_ms=lock_timeout_ms)
        return convert.checkpoint_from_pb(await self._call("CheckpointGpu", request, deadline_s))

    async def restore_gpu(self, namespace: str, container_id: str, pids: Sequence[int],
                          manifest: GpuManifest | Mapping[str, Any] | None = None,
                          gpu_map: Mapping[str, str] | None = None, deadline_s: float = 600.0, *,
                          cgroup_path: str = "") -> RestoreResult:
        """Restore (remapping GPUs when the manifest's are not all here) + unlock every CUDA process.
        `manifest` may be the parsed kybernate.json dict; None lets hookd use what it remembers."""
        from kybernate.api import hookd_pb2 as pb

        from . import convert

        request = pb.RestoreGpuRequest(container=_ref(pb, namespace, container_id, pids, cgroup_path),
                                       gpu_map=dict(gpu_map or {}))
        if manifest is not None:
            parsed = manifest if isinstance(manifest, GpuManifest) else GpuManifest.from_dict(manifest)
            request.manifest.CopyFrom(convert.manifest_to_pb(parsed))
        return convert.restore_from_pb(await self._call("RestoreGpu", request, deadline_s))

    async def status(self, namespace: str, container_id: str, pids: Sequence[int], deadline_s: float = 10.0, *,
                     cgroup_path: str = "") -> list[ProcessStatus]:
        """The driver's state of each CUDA process of the container."""
        from kybernate.api import hookd_pb2 as pb

        from . import convert

        request = pb.GpuStatusRequest(container=_ref(pb, namespace, container_id, pids, cgroup_path))
        return convert.status_from_pb(await self._call("GpuStatus", request, deadline_s))

    async def health(self, deadline_s: float = 5.0) -> HealthInfo:
        from kybernate.api import hookd_pb2 as pb

        from . import convert

        return convert.health_from_pb(await self._call("Health", pb.HealthRequest(), deadline_s))

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    async def __aenter__(self) -> HookdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, deadline_s: float) -> Any:
        if not os.path.exists(self.socket_path):
            raise HookdUnavailable(self.socket_path, "no socket")
        import grpc

        stub = await self._get_stub()
        try:
            return await getattr(stub, method)(request, timeout=deadline_s)
        except grpc.aio.AioRpcError as err:
            code = err.code()
            details = err.details() or code.name
            if code == grpc.StatusCode.UNAVAILABLE:
                raise HookdUnavailable(self.socket_path, details) from None
            # grpc-stubs types the items as objects; grpc.aio gives (key, value) pairs.
            trailers = cast("Iterable[tuple[str, str]]", err.trailing_metadata() or ())
            md = dict(trailers)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and METADATA_STEP not in md:
                details = f"kybernate-hookd did not answer {method} within {deadline_s:g} s"
            pid = md.get(METADATA_PID)
            raise HookdError(code.value[0], details, pid=int(pid) if pid and pid.isdigit() else None,
                             step=md.get(METADATA_STEP), driver_error=md.get(METADATA_DRIVER_ERROR)) from None

    async def _get_stub(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is not loop:
            self._channel = self._stub = None  # a channel works on the loop that made it only
        if self._stub is None:
            import grpc

            from kybernate.api import hookd_pb2_grpc

            self._channel = grpc.aio.insecure_channel(f"unix:{os.path.abspath(self.socket_path)}")
            make_stub: Callable[[Any], Any] = hookd_pb2_grpc.HookdStub  # generated code carries no annotations
            self._stub = make_stub(self._channel)
            self._loop = loop
        return self._stub


def _ref(pb: Any, namespace: str, container_id: str, pids: Sequence[int], cgroup_path: str) -> Any:
    return pb.ContainerRef(namespace=namespace, container_id=container_id, pids=[int(p) for p in pids],
                           cgroup_path=cgroup_path)
