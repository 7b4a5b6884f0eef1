"""A small client of containerd's own gRPC API (the daemon socket): the one Kybernate has.

`kybernate checkpoint` makes with it the calls the kubelet's CRI CheckpointContainer makes inside
containerd 2.x, from outside, so that containerd 1.6/1.7 (which have no CRI checkpoint) can write the same
archive: Containers.Get, Tasks.{Get,Pause,Checkpoint,Resume}, Snapshots.{Stat,View,Mounts,Remove},
Diff.Diff, Content.Read, and Leases.{Create,Delete} so that nothing written for us is collected before we
have read it. The test harness (tests/harness/containerd_api.py) adds Tasks.{Create,Start,Delete} for what
ctr cannot do: restore a task from a `Tasks.Checkpoint` image.

The messages are Kybernate's own (proto/kybernate/api/containerd_api.proto); the method paths are the
real containerd ones. Works against containerd 1.6 through 2.1 (the field numbers used agree).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from kybernate.api import containerd_api_pb2 as pb
from kybernate.api import runc_options_pb2
from kybernate.hooks.api.checkpoint import CHECKPOINT_OPTIONS_TYPE

TASKS = "/containerd.services.tasks.v1.Tasks/"
SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots/"
CONTAINERS = "/containerd.services.containers.v1.Containers/"
LEASES = "/containerd.services.leases.v1.Leases/"
DIFF = "/containerd.services.diff.v1.Diff/"
CONTENT = "/containerd.services.content.v1.Content/"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
CRIU_CHECKPOINT_MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
LAYER_TAR_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"

M = TypeVar("M", bound=Message)


class ContainerdError(RuntimeError):
    """A failed call: which method, on what, and what containerd answered."""

    def __init__(self, method: str, what: str, code: grpc.StatusCode | None, details: str | None) -> None:
        self.method = method
        self.code = code
        self.details = details or ""
        name = code.name if code is not None else "?"
        super().__init__(f"containerd {method} ({what}) failed: {name}: {self.details}")

    @property
    def not_found(self) -> bool:
        return self.code == grpc.StatusCode.NOT_FOUND


def criu_checkpoint(descriptors: Sequence[pb.Descriptor]) -> pb.Descriptor | None:
    """The CRIU image among what Tasks.Checkpoint returned (the other descriptor is the spec), or None."""
    return next((d for d in descriptors if d.media_type == CRIU_CHECKPOINT_MEDIA_TYPE), None)


def container_spec(container: pb.ContainerRecord) -> dict[str, Any]:
    """The container's OCI spec as containerd stores it; ValueError saying what is wrong with it."""
    try:
        spec = json.loads(container.spec.value or b"{}")
    except ValueError as err:
        raise ValueError(f"container {container.id!r}: its spec is not JSON: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"container {container.id!r}: its spec is not a JSON object")
    return spec


class ContainerdClient:
    """One connection to containerd's socket, in one namespace; use as a context manager."""

    def __init__(self, address: str | os.PathLike[str], namespace: str, *, timeout: float = 600.0) -> None:
        self.address = str(address).removeprefix("unix://")
        # Seconds for every call.
        self.namespace = namespace
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{self.address}")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ContainerdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- containers, tasks ----

    def get_container(self, container_id: str) -> pb.ContainerRecord:
        return self._call(CONTAINERS + "Get", pb.GetContainerRequest(id=container_id),
                          pb.GetContainerRecordResponse, f"container {container_id}").container

    def get_task(self, container_id: str) -> pb.Process:
        return self._call(TASKS + "Get", pb.GetRequest(container_id=container_id), pb.GetResponse,
                          f"task {container_id}").process

    def task_status(self, container_id: str) -> str:
        """"RUNNING", "STOPPED", ... (as ctr prints them)."""
        return pb.Status.Name(self.get_task(container_id).status).removeprefix("STATUS_")

    def create_task(self, container_id: str, rootfs: Sequence[pb.Mount], *, checkpoint: pb.Descriptor | None = None,
                    lease: str | None = None) -> int:
        """Tasks.Create with no stdio at all (the Go client's cio.NullIO: empty paths); returns the pid."""
        request = pb.CreateTaskRequest(container_id=container_id, rootfs=rootfs, checkpoint=checkpoint,
                                       stdin="", stdout="", stderr="", terminal=False)
        what = f"task {container_id}" + (f" from checkpoint {checkpoint.digest}" if checkpoint is not None else "")
        return self._call(TASKS + "Create", request, pb.CreateTaskResponse, what, lease=lease).pid

    def start_task(self, container_id: str) -> int:
        return self._call(TASKS + "Start", pb.StartRequest(container_id=container_id), pb.StartResponse,
                          f"task {container_id}").pid

    def delete_task(self, container_id: str) -> pb.DeleteResponse:
        return self._call(TASKS + "Delete", pb.DeleteTaskRequest(container_id=container_id), pb.DeleteResponse,
                          f"task {container_id}")

    def pause(self, container_id: str) -> None:
        self._call(TASKS + "Pause", pb.PauseTaskRequest(container_id=container_id), empty_pb2.Empty,
                   f"task {container_id}")

    def resume(self, container_id: str) -> None:
        self._call(TASKS + "Resume", pb.ResumeTaskRequest(container_id=container_id), empty_pb2.Empty,
                   f"task {container_id}")

    def checkpoint(self, container_id: str, *, lease: str, exit: bool = False,
                   work_path: str = "") -> list[pb.Descriptor]:
        """Tasks.Checkpoint with runc CheckpointOptions; the CRIU tar and spec land in the content store."""
        options = any_pb2.Any(
            type_url=CHECKPOINT_OPTIONS_TYPE,
            value=runc_options_pb2.CheckpointOptions(exit=exit, work_path=work_path).SerializeToString(),
        )
        request = pb.CheckpointTaskRequest(container_id=container_id, options=options)
        response = self._call(TASKS + "Checkpoint", request, pb.CheckpointTaskResponse,
                              f"task {container_id}", lease=lease)
        return list(response.descriptors)

    # ---- snapshots, diff, content ----

    def stat_snapshot(self, snapshotter: str, key: str) -> pb.SnapshotInfo:
        return self._call(SNAPSHOTS + "Stat", pb.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                          pb.StatSnapshotResponse, f"snapshot {key} of {snapshotter!r}").info

    def snapshot_mounts(self, snapshotter: str, key: str) -> list[pb.Mount]:
        return list(self._call(SNAPSHOTS + "Mounts", pb.MountsRequest(snapshotter=snapshotter, key=key),
                               pb.MountsResponse, f"snapshot {key} of {snapshotter!r}").mounts)

    def view_snapshot(self, snapshotter: str, key: str, parent: str, *, lease: str) -> list[pb.Mount]:
        request = pb.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent)
        return list(self._call(SNAPSHOTS + "View", request, pb.ViewSnapshotResponse,
                               f"view {key} of {parent} ({snapshotter!r})", lease=lease).mounts)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self._call(SNAPSHOTS + "Remove", pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                   empty_pb2.Empty, f"snapshot {key} of {snapshotter!r}")

    def diff(self, left: list[pb.Mount], right: list[pb.Mount], *, lease: str,
             media_type: str = LAYER_TAR_MEDIA_TYPE) -> pb.Descriptor:
        request = pb.DiffRequest(left=left, right=right, media_type=media_type,
                                 ref=f"kybernate-diff-{secrets.token_hex(8)}")
        return self._call(DIFF + "Diff", request, pb.DiffResponse, "rootfs changes", lease=lease).diff

    def read_content(self, digest: str, *, chunk_timeout: float | None = None) -> Iterator[bytes]:
        """The blob's bytes as containerd streams them (Content.Read)."""
        method = self._channel.unary_stream(CONTENT + "Read", request_serializer=_serialize,
                                            response_deserializer=pb.ReadContentResponse.FromString)
        stream = method(pb.ReadContentRequest(digest=digest), timeout=chunk_timeout or self.timeout,
                        metadata=((NAMESPACE_HEADER, self.namespace),))
        try:
            for response in stream:
                if response.data:
                    yield response.data
        except grpc.RpcError as e:
            raise ContainerdError("Content.Read", f"blob {digest}", e.code(), e.details()) from None

    # ---- leases ----

    def create_lease(self, *, expire_after: timedelta = timedelta(hours=1),
                     prefix: str = "kybernate-checkpoint") -> str:
        lease = f"{prefix}-{secrets.token_hex(6)}"
        expire = (datetime.now(UTC) + expire_after).strftime("%Y-%m-%dT%H:%M:%SZ")
        self._call(LEASES + "Create", pb.CreateRequest(id=lease, labels={LEASE_EXPIRE_LABEL: expire}),
                   pb.CreateResponse, f"lease {lease}")
        return lease

    def delete_lease(self, lease: str) -> None:
        self._call(LEASES + "Delete", pb.DeleteRequest(id=lease), empty_pb2.Empty, f"lease {lease}")

    # ---- internals ----

    def _call(self, path: str, request: Message, response_type: type[M], what: str, *,
              lease: str | None = None) -> M:
        metadata = ((NAMESPACE_HEADER, self.namespace),) + (((LEASE_HEADER, lease),) if lease is not None else ())
        method: Callable[..., M] = self._channel.unary_unary(
            path, request_serializer=_serialize, response_deserializer=response_type.FromString,
        )
        try:
            return method(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as e:
            service, name = path.strip("/").rsplit("/", 1)
            raise ContainerdError(f"{service.rsplit('.', 1)[1]}.{name}", what, e.code(), e.details()) from None


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
