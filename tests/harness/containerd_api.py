"""What ctr cannot do, done through Kybernate's one containerd client (kybernate.hooks.containerd.client).

ctr cannot checkpoint a task *with exit* under a runtime whose name is not io.containerd.runc.* (1.6 only
sets the checkpoint options for those names) and cannot restore a `ctr tasks checkpoint` image. The Go
client can: Tasks.Checkpoint with containerd.runc.v1.CheckpointOptions{exit}, then Tasks.Create with the
CRIU image descriptor as `checkpoint`. ContainerdApi does the same calls, in the same order:

    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("cnt", exit=True)   # pause, checkpoint, resume (as the Go client)
        ...                                                    # the task is STOPPED; delete it
        api.create_task_from_checkpoint("cnt", criu_checkpoint(descriptors))
        pid = api.start_task("cnt")                            # runc restores here, not at create

The checkpoint content is written under a lease that this client holds until close(), so a garbage
collection in between cannot remove it (the lease also expires by itself an hour later, should close()
never run).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from kybernate.api import containerd_api_pb2 as pb
from kybernate.hooks.containerd import client as containerd_client
from kybernate.hooks.containerd.client import CRIU_CHECKPOINT_MEDIA_TYPE, ContainerdClient, ContainerdError

__all__ = ["CRIU_CHECKPOINT_MEDIA_TYPE", "ContainerdApi", "ContainerdError", "criu_checkpoint", "pb"]


def criu_checkpoint(descriptors: Sequence[pb.Descriptor]) -> pb.Descriptor:
    """The CRIU image among what checkpoint_task returned (the other descriptor is the spec)."""
    found = containerd_client.criu_checkpoint(descriptors)
    if found is None:
        raise ValueError(f"no {CRIU_CHECKPOINT_MEDIA_TYPE} among {[d.media_type for d in descriptors]}")
    return found


class ContainerdApi(ContainerdClient):
    """The client, plus the Go client's checkpoint and restore sequences, under one lease held until close()."""

    def __init__(self, address: str | os.PathLike[str], namespace: str, *, timeout: float = 30.0) -> None:
        super().__init__(address, namespace, timeout=timeout)
        self._lease: str | None = None

    def close(self) -> None:
        try:
            if self._lease is not None:
                lease, self._lease = self._lease, None
                self.delete_lease(lease)
        finally:
            super().close()

    def checkpoint_task(self, container_id: str, exit: bool, *, pause: bool = True) -> list[pb.Descriptor]:
        """Checkpoint the task into the content store; returns the descriptors (CRIU tar, spec).

        exit: the runtime ends the task after the dump (CheckpointOptions.exit), else it keeps running.
        pause: pause it around the checkpoint and resume afterwards, as the Go client does (the resume of
        a task that exited fails, and is not an error then).
        """
        paused = False
        if pause and self.get_task(container_id).status != pb.STATUS_PAUSED:
            self.pause(container_id)
            paused = True
        try:
            descriptors = self.checkpoint(container_id, lease=self._ensure_lease(), exit=exit)
        finally:
            if paused:
                try:
                    self.resume(container_id)
                except ContainerdError:
                    if not exit:
                        raise
        if not descriptors:
            raise ContainerdError("Tasks.Checkpoint", f"task {container_id}", None,
                                  "returned no descriptors (a checkpoint image_path option keeps it out of the store)")
        return descriptors

    def create_task_from_checkpoint(self, container_id: str, checkpoint: pb.Descriptor) -> int:
        """Create the container's task from a CRIU checkpoint descriptor; returns the pid containerd reports.

        The rootfs is the mounts of the container's own snapshot (as the Go client's NewTask); stdio is
        none at all. runc restores the process at start_task.
        """
        if checkpoint.media_type != CRIU_CHECKPOINT_MEDIA_TYPE:
            raise ValueError(f"checkpoint descriptor has media type {checkpoint.media_type!r}, "
                             f"want {CRIU_CHECKPOINT_MEDIA_TYPE!r} (pick it with criu_checkpoint())")
        container = self.get_container(container_id)
        if not container.snapshot_key:
            raise ContainerdError("Containers.Get", f"container {container_id}", None,
                                  "the container has no snapshot key: nothing to mount as its rootfs")
        mounts = self.snapshot_mounts(container.snapshotter, container.snapshot_key)
        return self.create_task(container_id, mounts, checkpoint=checkpoint, lease=self._lease)

    def _ensure_lease(self) -> str:
        if self._lease is None:
            self._lease = self.create_lease(prefix="kyb-test")
        return self._lease
