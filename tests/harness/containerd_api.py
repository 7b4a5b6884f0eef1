"""A small client of containerd's own gRPC API (the daemon socket), for what ctr cannot do.

ctr cannot checkpoint a task *with exit* under a runtime whose name is not io.containerd.runc.* (1.6 only
sets the checkpoint options for those names) and cannot restore a `ctr tasks checkpoint` image. The Go
client can: Tasks.Checkpoint with containerd.runc.v1.CheckpointOptions{exit}, then Tasks.Create with the
CRIU image descriptor as `checkpoint`. ContainerdApi does the same calls, in the same order:

    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("cnt", exit=True)   # pause, checkpoint, resume (as the Go client)
        ...                                                    # the task is STOPPED; delete it
        api.create_task_from_checkpoint("cnt", criu_checkpoint(descriptors))
        pid = api.start_task("cnt")                            # runc restores here, not at create

Messages come from Kybernate's proto/kybernate/api/containerd_api.proto; the method paths are the real
containerd ones (one .proto file cannot hold the four packages they live in). The checkpoint content is
written under a lease that this client holds until close(), so a garbage collection in between cannot
remove it (the lease also expires by itself an hour later, should close() never run).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from kybernate.api import containerd_api_pb2 as pb
from kybernate.api import runc_options_pb2

__all__ = [
    "CHECKPOINT_OPTIONS_TYPE", "CRIU_CHECKPOINT_MEDIA_TYPE", "ContainerdApi", "ContainerdApiError", "criu_checkpoint",
    "pb",
]

TASKS = "/containerd.services.tasks.v1.Tasks/"
SNAPSHOTS = "/containerd.services.snapshots.v1.Snapshots/"
CONTAINERS = "/containerd.services.containers.v1.Containers/"
LEASES = "/containerd.services.leases.v1.Leases/"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
# Bare full name, as the Go client's typeurl writes it for a protobuf message.
CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"
# The CRIU image tar in the content store (images.MediaTypeContainerd1Checkpoint upstream).
CRIU_CHECKPOINT_MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"

M = TypeVar("M", bound=Message)


class ContainerdApiError(RuntimeError):
    """A failed call: which method, for which container, and what containerd answered."""

    def __init__(self, method: str, what: str, code: grpc.StatusCode | None, details: str) -> None:
        self.method = method
        self.code = code
        self.details = details
        name = code.name if code is not None else "?"
        super().__init__(f"containerd {method} ({what}) failed: {name}: {details}")


def criu_checkpoint(descriptors: Sequence[pb.Descriptor]) -> pb.Descriptor:
    """The CRIU image among what checkpoint_task returned (the other descriptor is the spec)."""
    for d in descriptors:
        if d.media_type == CRIU_CHECKPOINT_MEDIA_TYPE:
            return d
    raise ValueError(f"no {CRIU_CHECKPOINT_MEDIA_TYPE} among {[d.media_type for d in descriptors]}")


class ContainerdApi:
    def __init__(self, address: str | Path, namespace: str, *, timeout: float = 30.0) -> None:
        self.address = str(address)
        self.namespace = namespace
        # Seconds for every call.
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{self.address}")
        self._lease: str | None = None

    def close(self) -> None:
        try:
            if self._lease is not None:
                lease, self._lease = self._lease, None
                self._call(LEASES + "Delete", pb.DeleteRequest(id=lease), empty_pb2.Empty, f"lease {lease}")
        finally:
            self._channel.close()

    def __enter__(self) -> ContainerdApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tasks ----

    def checkpoint_task(self, container_id: str, exit: bool, *, pause: bool = True) -> list[pb.Descriptor]:
        """Checkpoint the task into the content store; returns the descriptors (CRIU tar, spec).

        exit: the runtime ends the task after the dump (CheckpointOptions.exit), else it keeps running.
        pause: pause it around the checkpoint and resume afterwards, as the Go client does (the resume of
        a task that exited fails, and is not an error then).
        """
        options = any_pb2.Any(type_url=CHECKPOINT_OPTIONS_TYPE,
                              value=runc_options_pb2.CheckpointOptions(exit=exit).SerializeToString())
        request = pb.CheckpointTaskRequest(container_id=container_id, options=options)
        paused = False
        if pause and self.get_task(container_id).status != pb.STATUS_PAUSED:
            self.pause_task(container_id)
            paused = True
        try:
            response = self._call(TASKS + "Checkpoint", request, pb.CheckpointTaskResponse,
                                  f"task {container_id}, exit={exit}", lease=self._ensure_lease())
        finally:
            if paused:
                try:
                    self.resume_task(container_id)
                except ContainerdApiError:
                    if not exit:
                        raise
        if not response.descriptors:
            raise ContainerdApiError("Tasks.Checkpoint", f"task {container_id}", None,
                                     "returned no descriptors (a checkpoint image_path option keeps it out of the store)")
        return list(response.descriptors)

    def create_task_from_checkpoint(self, container_id: str, checkpoint: pb.Descriptor) -> int:
        """Create the container's task from a CRIU checkpoint descriptor; returns the pid containerd reports.

        The rootfs is the mounts of the container's own snapshot (as the Go client's NewTask); stdio is
        none at all (the Go client's cio.NullIO: empty paths). runc restores the process at start_task.
        """
        if checkpoint.media_type != CRIU_CHECKPOINT_MEDIA_TYPE:
            raise ValueError(f"checkpoint descriptor has media type {checkpoint.media_type!r}, "
                             f"want {CRIU_CHECKPOINT_MEDIA_TYPE!r} (pick it with criu_checkpoint())")
        container = self.get_container(container_id)
        if not container.snapshot_key:
            raise ContainerdApiError("Containers.Get", f"container {container_id}", None,
                                     "the container has no snapshot key: nothing to mount as its rootfs")
        mounts = self.snapshot_mounts(container.snapshotter, container.snapshot_key)
        request = pb.CreateTaskRequest(container_id=container_id, rootfs=mounts, checkpoint=checkpoint,
                                       stdin="", stdout="", stderr="", terminal=False)
        response = self._call(TASKS + "Create", request, pb.CreateTaskResponse,
                              f"task {container_id} from checkpoint {checkpoint.digest}", lease=self._lease)
        return response.pid

    def start_task(self, container_id: str) -> int:
        response = self._call(TASKS + "Start", pb.StartRequest(container_id=container_id), pb.StartResponse,
                              f"task {container_id}")
        return response.pid

    def delete_task(self, container_id: str) -> pb.DeleteResponse:
        return self._call(TASKS + "Delete", pb.DeleteTaskRequest(container_id=container_id), pb.DeleteResponse,
                          f"task {container_id}")

    def get_task(self, container_id: str) -> pb.Process:
        response = self._call(TASKS + "Get", pb.GetRequest(container_id=container_id), pb.GetResponse,
                              f"task {container_id}")
        return response.process

    def task_status(self, container_id: str) -> str:
        """"RUNNING", "STOPPED", ... (as ctr prints them)."""
        return pb.Status.Name(self.get_task(container_id).status).removeprefix("STATUS_")

    def pause_task(self, container_id: str) -> None:
        self._call(TASKS + "Pause", pb.PauseTaskRequest(container_id=container_id), empty_pb2.Empty,
                   f"task {container_id}")

    def resume_task(self, container_id: str) -> None:
        self._call(TASKS + "Resume", pb.ResumeTaskRequest(container_id=container_id), empty_pb2.Empty,
                   f"task {container_id}")

    # ---- containers, snapshots ----

    def get_container(self, container_id: str) -> pb.Container:
        response = self._call(CONTAINERS + "Get", pb.GetContainerRequest(id=container_id), pb.GetContainerResponse,
                              f"container {container_id}")
        return response.container

    def snapshot_mounts(self, snapshotter: str, key: str) -> list[pb.Mount]:
        response = self._call(SNAPSHOTS + "Mounts", pb.MountsRequest(snapshotter=snapshotter, key=key),
                              pb.MountsResponse, f"snapshot {key} of {snapshotter!r}")
        return list(response.mounts)

    # ---- internals ----

    def _ensure_lease(self) -> str:
        if self._lease is None:
            lease = f"kyb-test-{secrets.token_hex(6)}"
            expire = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._call(LEASES + "Create", pb.CreateRequest(id=lease, labels={LEASE_EXPIRE_LABEL: expire}),
                       pb.CreateResponse, f"lease {lease}")
            self._lease = lease
        return self._lease

    def _call(self, path: str, request: Message, response_type: type[M], what: str, *, lease: str | None = None) -> M:
        metadata = [(NAMESPACE_HEADER, self.namespace)]
        if lease is not None:
            metadata.append((LEASE_HEADER, lease))
        method: Callable[..., Any] = self._channel.unary_unary(
            path, request_serializer=_serialize, response_deserializer=response_type.FromString,
        )
        try:
            return method(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as e:
            service, name = path.strip("/").rsplit("/", 1)
            raise ContainerdApiError(f"{service.rsplit('.', 1)[1]}.{name}", what, e.code(), e.details()) from None


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
