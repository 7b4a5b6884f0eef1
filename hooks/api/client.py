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
from .errors import METADATA_DRIVER_ERROR, METADATA_PID, METADATA_STEP, Code
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
    RoomMade,
    StepTiming,
    StoreCheckpointResult,
    StoreProgress,
)

__all__ = [
    "DEFAULT_SOCKET", "MANIFEST_FILE", "CheckpointResult", "GpuDeviceRecord", "GpuManifest", "GpuPair",
    "GpuProcessRecord", "HealthInfo", "HookdClient", "HookdError", "HookdUnavailable", "ManifestError", "NodeGpu",
    "ProcessOutcome", "ProcessStatus", "RestoreResult", "RoomMade", "StepTiming", "StoreCheckpointResult",
    "StoreProgress",
]

# While a call is in flight the channel pings hookd every KEEPALIVE_INTERVAL_MS and gives the
# connection up when a ping is not answered within KEEPALIVE_TIMEOUT_MS: a daemon that stopped
# answering (SIGSTOP, hung, gone without closing the socket) fails the call as unavailable in about
# KEEPALIVE_S, whatever its deadline; a new connection nobody answers fails after KEEPALIVE_TIMEOUT_MS.
# gRPC's core answers pings on its own threads, so a daemon busy with a long checkpoint keeps
# answering them. hookd allows pings this often (ServerSettings).
KEEPALIVE_INTERVAL_MS = 2_000
KEEPALIVE_TIMEOUT_MS = 3_000
KEEPALIVE_S = (KEEPALIVE_INTERVAL_MS + KEEPALIVE_TIMEOUT_MS) / 1000
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", KEEPALIVE_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),  # newer gRPC times pings out by this one
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # A connection the kernel accepted but nobody answers (a daemon stopped before it accepted):
    # gRPC's connect timeout is this backoff minimum, 20 s by default.
    ("grpc.min_reconnect_backoff_ms", KEEPALIVE_TIMEOUT_MS),
    # After hookd went away the channel backs off between connection attempts (1 s, growing to minutes by
    # default), failing calls at once meanwhile: a hookd restarted by systemd would stay unreachable for that
    # long. A unix socket costs nothing to retry: start at 100 ms and never wait more than 1 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # A channel of its own connection (not gRPC's process-wide pool), so that a fresh channel after a refused
    # connection really connects anew (see _call).
    ("grpc.use_local_subchannel_pool", 1),
)



class HookdUnavailable(Exception):
    """Nothing answers on hookd's socket."""

    def __init__(self, socket_path: str, reason: str = "") -> None:
        super().__init__(f"kybernate-hookd is not reachable at {socket_path}: start it "
                         "(systemctl start kybernate-hookd)" + (f" [{reason}]" if reason else ""))
        self.socket_path = socket_path
        self.reason = reason
        # True when the request never reached hookd (no socket, connection refused): nothing was changed.
        # A hookd that dies mid-call shows as a closed or reset connection instead.
        self.nothing_sent = reason == "no socket" or "failed to connect" in reason.lower()


class HookdError(Exception):
    """hookd answered with an error status. `code` is the shared Code (an IntEnum: 9 = FAILED_PRECONDITION).

    When a driver step failed: `pid`, `step` (lock|checkpoint|restore|unlock|get_state) and
    `driver_error` (e.g. CUDA_ERROR_TIMEOUT) say where.
    """

    def __init__(self, code: int, message: str, *, pid: int | None = None, step: str | None = None,
                 driver_error: str | None = None) -> None:
        self.code = Code.from_wire(int(code))
        super().__init__(f"{self.code.name}: {message}")
        self.message = message
        self.pid = pid
        self.step = step
        self.driver_error = driver_error

    @property
    def code_name(self) -> str:
        return self.code.name


class HookdClient:
    """One connection to hookd, opened on first use and reused; bound to the event loop that first uses it."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET) -> None:
        self.socket_path = socket_path
        self._channel: Any = None
        self._stub: Any = None
        self._store_stub: Any = None
        self._standby_stub: Any = None
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

    async def store_checkpoint(self, namespace: str, container_id: str, key: str = "", *,
                               leave_running: bool = False, deadline_s: float = 3600.0, reason: str = "cli",
                               on_progress: Callable[[StoreProgress], None] | None = None) -> StoreCheckpointResult:
        """hookd's Store.Checkpoint: the container into the store (key "" = its checkpoint-key annotation or
        default key). `on_progress` gets every progress message; the result is the committed generation.
        deadline_s bounds the whole checkpoint: past it hookd rolls back (DEADLINE_EXCEEDED)."""
        from kybernate.api import store_pb2 as spb

        request = spb.CheckpointRequest(namespace=namespace, container_id=container_id, key=key,
                                        leave_running=leave_running, deadline_ms=int(deadline_s * 1000),
                                        reason=reason)
        last: Any = None

        async def consume(stub: Any) -> Any:
            nonlocal last
            async for message in stub.Checkpoint(request, timeout=deadline_s + KEEPALIVE_S):
                if on_progress is not None:
                    on_progress(StoreProgress(message.phase, message.bytes_done, message.bytes_total))
                if message.HasField("result"):
                    last = message.result
            return last

        result = await self._call_with(self._get_store_stub, consume, "Store.Checkpoint", deadline_s)
        if result is None:
            raise HookdError(Code.INTERNAL, "kybernate-hookd ended Store.Checkpoint without a result")
        return StoreCheckpointResult(key=result.key, generation=result.generation, path=result.path,
                                     size_bytes=result.size_bytes, pause_s=result.pause_s, total_s=result.total_s,
                                     phase_s=dict(result.phase_s), upload_queued=result.upload_queued)

    async def make_room(self, namespace: str, container_id: str, bundle: str, needs: Mapping[str, int], why: str,
                        deadline_s: float = 600.0) -> RoomMade:
        """hookd's Standby.MakeRoom before a GPU container starts: `needs` is VRAM bytes by GPU (UUID, NVML
        index or "all"). HookdUnavailable also when hookd runs without --standby (there is no arbiter)."""
        from kybernate.api import standby_pb2 as spb

        request = spb.MakeRoomRequest(namespace=namespace, container_id=container_id, bundle=bundle, why=why,
                                      needs=[spb.GpuNeed(gpu=g, bytes=int(n)) for g, n in needs.items()])

        async def unary(stub: Any) -> Any:
            return await stub.MakeRoom(request, timeout=deadline_s)

        reply = await self._call_with(self._get_standby_stub, unary, "Standby.MakeRoom", deadline_s)
        return RoomMade(victims=tuple(reply.victims), reason=reply.reason)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub, self._store_stub = self._channel, None, None, None
            self._standby_stub = None
            await channel.close()

    async def __aenter__(self) -> HookdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, deadline_s: float) -> Any:
        async def unary(stub: Any) -> Any:
            return await getattr(stub, method)(request, timeout=deadline_s)

        return await self._call_with(self._get_stub, unary, method, deadline_s)

    async def _call_with(self, get_stub: Callable[[], Any], invoke: Callable[[Any], Any], method: str,
                         deadline_s: float) -> Any:
        if not os.path.exists(self.socket_path):
            raise HookdUnavailable(self.socket_path, "no socket")
        import grpc

        stub = await get_stub()
        try:
            try:
                return await invoke(stub)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or not _not_connected(err.details() or ""):
                    raise
                # The request never left: the channel is still backing off after hookd went away (its socket
                # refused a connection). hookd may be back since: one fresh channel, one more try.
                await self._reset_channel()
                stub = await get_stub()
                return await invoke(stub)
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

    async def _reset_channel(self) -> None:
        channel, self._channel, self._stub, self._store_stub = self._channel, None, None, None
        self._standby_stub = None
        if channel is not None:
            await channel.close()

    async def _get_stub(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._channel is not None and self._loop is not loop:
            # a channel works on the loop that made it only
            self._channel = self._stub = self._store_stub = self._standby_stub = None
        if self._stub is None:
            import grpc

            from kybernate.api import hookd_pb2_grpc

            self._channel = grpc.aio.insecure_channel(f"unix:{os.path.abspath(self.socket_path)}",
                                                      options=list(_CHANNEL_OPTIONS))
            make_stub: Callable[[Any], Any] = hookd_pb2_grpc.HookdStub  # generated code carries no annotations
            self._stub = make_stub(self._channel)
            self._loop = loop
        return self._stub

    async def _get_store_stub(self) -> Any:
        await self._get_stub()  # the one channel
        if self._store_stub is None:
            from kybernate.api import store_pb2_grpc

            make_stub: Callable[[Any], Any] = store_pb2_grpc.StoreStub
            self._store_stub = make_stub(self._channel)
        return self._store_stub

    async def _get_standby_stub(self) -> Any:
        await self._get_stub()  # the one channel
        if self._standby_stub is None:
            from kybernate.api import standby_pb2_grpc

            make_stub: Callable[[Any], Any] = standby_pb2_grpc.StandbyStub
            self._standby_stub = make_stub(self._channel)
        return self._standby_stub


def _not_connected(details: str) -> bool:
    """gRPC's words for a call that failed before it reached hookd: no connection could be made."""
    return "failed to connect" in details.lower() or "connection refused" in details.lower()


def _ref(pb: Any, namespace: str, container_id: str, pids: Sequence[int], cgroup_path: str) -> Any:
    return pb.ContainerRef(namespace=namespace, container_id=container_id, pids=[int(p) for p in pids],
                           cgroup_path=cgroup_path)
