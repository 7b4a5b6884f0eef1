"""`kybernate checkpoint --output X.tar`: a CRI-style checkpoint archive of a running container, through containerd.

containerd 1.6 and 1.7 have no CRI CheckpointContainer. This command makes the calls that containerd 2.x's
CRI plugin makes and writes the same archive layout (checkpointctl's), so that the shim's
`kybernate.io/restore-from` (shim/restore_from.py) restores it into a new pod on any containerd:

    checkpoint/        the CRIU images (and kybernate.json for GPU containers: our shim writes it there)
    rootfs-diff.tar    the container's file changes against its image (a plain tar, no whiteouts)
    deleted.files      JSON list of the image's files the container removed (only when there are any)
    config.dump        id, name, rootfsImage(Name/Ref), runtime, createdTime, checkpointedTime
    spec.dump          the container's OCI runtime spec

Steps: Containers.Get + Tasks.Get → lease → Pause → Tasks.Checkpoint (leave running) → rootfs diff while
still paused (Snapshots.Stat(key).parent, a View of the parent, Diff.Diff(view, container) as an
uncompressed layer tar, Remove the view), as containerd's own client does, so that files and memory are of
one moment → Resume (always) → Content.Read the CRIU tar into checkpoint/ and the diff into rootfs-diff.tar,
turning OCI whiteouts (`.wh.NAME`) into deleted.files → dumps → one tar, renamed into place.
The container is resumed whatever fails, and the lease is dropped at the end, so nothing stays behind in
containerd's content store. Progress goes to stderr; the exit status is non-zero on failure.

Usage:
    python -m kybernate.hooks.cli.checkpoint_archive checkpoint --address /run/containerd/containerd.sock \\
        --namespace k8s.io CONTAINER_ID --output /var/lib/kybernate/checkpoints/NAME.tar
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from google.protobuf import timestamp_pb2

from kybernate.api import containerd_api_pb2 as pb
from kybernate.hooks.api.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_DUMP,
    DELETED_FILES,
    ROOTFS_DIFF,
    SPEC_DUMP,
)
from kybernate.hooks.api.store import human
from kybernate.hooks.containerd import rootfs
from kybernate.hooks.containerd.client import ContainerdClient, ContainerdError, container_spec, criu_checkpoint

# CRI annotations on the spec that name a container the way CRI's container names are made.
_CRI_NAME_PARTS = (
    "io.kubernetes.cri.container-name",
    "io.kubernetes.cri.sandbox-name",
    "io.kubernetes.cri.sandbox-namespace",
    "io.kubernetes.cri.sandbox-uid",
)


class CheckpointError(Exception):
    """The checkpoint could not be written; the message says what and why (the container runs on)."""


class Progress:
    """One line per phase on stderr: elapsed seconds since the start, the phase, and what it produced."""

    def __init__(self, out: TextIO = sys.stderr, *, quiet: bool = False) -> None:
        self.out = out
        self.quiet = quiet
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{self.elapsed():7.2f}s] {message}", file=self.out, flush=True)


def _rfc3339(ts: timestamp_pb2.Timestamp | None) -> str:
    when = ts.ToDatetime(tzinfo=UTC) if ts is not None and (ts.seconds or ts.nanos) else None
    return _format_time(when or datetime.fromtimestamp(0, UTC))


def _format_time(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _container_name(container: pb.ContainerRecord, spec: dict[str, Any]) -> str:
    """CRI's `<container>_<pod>_<namespace>_<uid>_<attempt>` when the spec carries CRI's annotations."""
    notes = spec.get("annotations") or {}
    parts = [notes.get(key, "") for key in _CRI_NAME_PARTS]
    if parts[0]:
        return "_".join([*parts, "0"])
    return container.labels.get("io.kubernetes.container.name") or container.id


class Checkpointer:
    def __init__(self, client: ContainerdClient, container_id: str, output: str, progress: Progress) -> None:
        self.client = client
        self.container_id = container_id
        self.output = os.path.abspath(output)
        self.progress = progress

    # ---- the whole run ----

    def run(self) -> str:
        container, _ = self._inspect()
        out_dir = os.path.dirname(self.output)
        if not os.path.isdir(out_dir):
            raise CheckpointError(f"output directory {out_dir} does not exist")
        spec = self._spec(container)
        lease = self.client.create_lease()
        workdir = ""
        try:
            workdir = tempfile.mkdtemp(prefix=".kybernate-checkpoint-", dir=out_dir)
            checkpointed_at = datetime.now(UTC)
            descriptors, diff = self._checkpoint(container, lease)
            criu = criu_checkpoint(descriptors)
            if criu is None:
                raise CheckpointError(
                    f"checkpoint of {self.container_id} returned no CRIU image "
                    f"(got {[d.media_type for d in descriptors]})"
                )
            self._unpack_criu(criu, os.path.join(workdir, CHECKPOINT_DIR))
            if diff is not None:
                self._write_rootfs_diff(diff, workdir)
            self._dumps(container, spec, checkpointed_at, workdir)
            self._write_archive(workdir)
        finally:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            try:
                self.client.delete_lease(lease)
            except ContainerdError as err:  # it expires by itself within the hour
                self.progress(f"warning: could not delete lease {lease}: {err}")
        return self.output

    # ---- phases ----

    def _inspect(self) -> tuple[pb.ContainerRecord, pb.Process]:
        try:
            container = self.client.get_container(self.container_id)
        except ContainerdError as err:
            if err.not_found:
                raise CheckpointError(
                    f"container {self.container_id!r} not found in namespace {self.client.namespace!r} "
                    f"of {self.client.address} (use the full containerd/CRI container id)"
                ) from None
            raise
        try:
            task = self.client.get_task(self.container_id)
        except ContainerdError as err:
            if err.not_found:
                raise CheckpointError(f"container {self.container_id!r} is not running (it has no task)") from None
            raise
        status = pb.Status.Name(task.status).removeprefix("STATUS_")
        if task.status != pb.STATUS_RUNNING:
            raise CheckpointError(
                f"container {self.container_id!r} is {status}: only running containers can be checkpointed"
            )
        self.progress(f"container {self.container_id}: image {container.image or '-'}, "
                      f"runtime {container.runtime.name}, pid {task.pid}, {status}")
        return container, task

    def _spec(self, container: pb.ContainerRecord) -> dict[str, Any]:
        try:
            return container_spec(container)
        except ValueError as err:
            raise CheckpointError(str(err)) from None

    def _checkpoint(self, container: pb.ContainerRecord,
                    lease: str) -> tuple[list[pb.Descriptor], pb.Descriptor | None]:
        """Pause → CRIU dump (leave running) → rootfs diff → Resume, as containerd's client does: the
        diff is taken while the task is still frozen, so files and memory are of the same moment."""
        cid = self.container_id
        t0 = self.progress.elapsed()
        failure: BaseException | None = None
        descriptors: list[pb.Descriptor] = []
        diff: pb.Descriptor | None = None
        step = "pause"
        paused = False
        try:
            self.client.pause(cid)
            paused = True
            self.progress(f"paused ({self.progress.elapsed() - t0:.2f}s)")
            t1 = self.progress.elapsed()
            step = "checkpoint"
            descriptors = self.client.checkpoint(cid, lease=lease, exit=False)
            self.progress(f"checkpointed (CRIU dump, {self.progress.elapsed() - t1:.2f}s)")
            t2 = self.progress.elapsed()
            step = "rootfs diff"
            diff = self._diff_blob(container, lease)
            self.progress(f"rootfs diff computed ({self.progress.elapsed() - t2:.2f}s)")
        except (ContainerdError, KeyboardInterrupt) as err:
            failure = err
        finally:
            self._resume(cid, paused)
        if failure is not None:
            raise CheckpointError(f"{step} of container {cid!r} failed; it runs on: {failure}") from None
        return descriptors, diff

    def _resume(self, cid: str, paused: bool) -> None:
        """Resume after a pause, and make sure the task is running again whatever happened before."""
        try:
            if paused:
                self.client.resume(cid)
            elif self.client.get_task(cid).status in (pb.STATUS_PAUSED, pb.STATUS_PAUSING):
                self.client.resume(cid)
        except ContainerdError as err:
            try:
                status = self.client.get_task(cid).status
            except ContainerdError:
                status = pb.STATUS_UNKNOWN
            if status != pb.STATUS_RUNNING:
                raise CheckpointError(
                    f"container {cid!r} could not be resumed after the checkpoint: {err} "
                    f"(status {pb.Status.Name(status)}): "
                    f"resume it with `ctr -n {self.client.namespace} task resume {cid}`"
                ) from None
        self.progress("resumed")

    def _unpack_criu(self, criu: pb.Descriptor, target: str) -> None:
        t0 = self.progress.elapsed()
        os.makedirs(target, mode=0o700)
        reader = rootfs.ChunkReader(self.client.read_content(criu.digest))
        try:
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as tar:
                tar.extractall(target, filter="data")
        except (tarfile.TarError, OSError) as err:
            raise CheckpointError(f"cannot unpack the CRIU image {criu.digest}: {err}") from None
        if not os.path.isfile(os.path.join(target, "inventory.img")):
            raise CheckpointError(f"the CRIU image {criu.digest} has no inventory.img")
        files = len(os.listdir(target))
        self.progress(f"CRIU images: {human(reader.total)} in {files} files "
                      f"({self.progress.elapsed() - t0:.2f}s)")

    def _diff_blob(self, container: pb.ContainerRecord, lease: str) -> pb.Descriptor | None:
        """Diff.Diff of the container's snapshot against a view of its parent (the image), into the store."""
        return rootfs.diff_blob(self.client, container, lease, self._warn)

    def _write_rootfs_diff(self, descriptor: pb.Descriptor, workdir: str) -> None:
        t0 = self.progress.elapsed()
        deleted = self._copy_diff(descriptor, os.path.join(workdir, ROOTFS_DIFF))
        if deleted:
            with open(os.path.join(workdir, DELETED_FILES), "w") as f:
                json.dump(deleted, f)
        size = os.path.getsize(os.path.join(workdir, ROOTFS_DIFF))
        self.progress(f"rootfs diff: {human(size)}, {len(deleted)} deleted "
                      f"({self.progress.elapsed() - t0:.2f}s)")

    def _copy_diff(self, descriptor: pb.Descriptor, target: str) -> list[str]:
        """Copy the diff blob into `target` minus its whiteouts, which become the returned deleted paths."""
        try:
            return rootfs.copy_diff(self.client, descriptor, target, self._warn)
        except rootfs.RootfsError as err:
            raise CheckpointError(str(err)) from None

    def _warn(self, message: str) -> None:
        self.progress(f"warning: {message}")
    def _dumps(self, container: pb.ContainerRecord, spec: dict[str, Any], checkpointed_at: datetime,
               workdir: str) -> None:
        config = {
            "id": container.id,
            "name": _container_name(container, spec),
            "rootfsImage": container.image,
            "rootfsImageRef": container.image,
            "rootfsImageName": container.image,
            "runtime": container.runtime.name,
            "createdTime": _rfc3339(container.created_at),
            "checkpointedTime": _format_time(checkpointed_at),
        }
        with open(os.path.join(workdir, CONFIG_DUMP), "w") as f:
            json.dump(config, f)
        with open(os.path.join(workdir, SPEC_DUMP), "w") as f:
            json.dump(spec, f)

    def _write_archive(self, workdir: str) -> None:
        t0 = self.progress.elapsed()
        tmp = os.path.join(os.path.dirname(self.output),
                           f".{os.path.basename(self.output)}.tmp-{secrets.token_hex(4)}")
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for name in sorted(os.listdir(workdir)):
                    tar.add(os.path.join(workdir, name), arcname=name)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.rename(tmp, self.output)
        except BaseException:
            with _ignored():
                os.unlink(tmp)
            raise
        self.progress(f"wrote {self.output}: {human(os.path.getsize(self.output))} "
                      f"({self.progress.elapsed() - t0:.2f}s)")


class _ignored:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def checkpoint(address: str, namespace: str, container_id: str, output: str, *,
               progress: Progress | None = None, timeout: float = 600.0) -> str:
    """Write the archive of `container_id` to `output`; returns its path. Raises CheckpointError."""
    progress = progress or Progress()
    if not os.path.exists(address.removeprefix("unix://")):
        raise CheckpointError(f"no containerd socket at {address}")
    with ContainerdClient(address, namespace, timeout=timeout) as client:
        try:
            return Checkpointer(client, container_id, output, progress).run()
        except ContainerdError as err:
            raise CheckpointError(str(err)) from None
