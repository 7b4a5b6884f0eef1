"""`kybernate checkpoint <container> [--key K]`: dump a running container straight into the store.

containerd's own checkpoint (ctr, CRI) has CRIU write into a temp dir and then copies the images into
containerd's content store, which costs far more than the dump at GPU sizes. And containerd 1.6's task
service only passes a caller's image path to runtimes named `io.containerd.runc*`. So this path asks our
shim directly, over its ttrpc socket (the address is derived from containerd's address, the namespace and
the container's shim group exactly as the shim derives it: shim/manager.py socket_address), for a
Checkpoint whose `path` is the store's temp dir. The shim runs its usual GPU steps (lock + checkpoint
before the dump, restore + unlock after a leave-running dump or a failure) and has its runc child dump
there; nothing goes through containerd's content store.

Steps: Containers.Get + Tasks.Get (must be RUNNING) → Store.begin (temp dir) → Tasks.Pause through
containerd (so containerd's view of the task matches; the shim checkpoints the GPU first) → shim
Checkpoint(path=<temp>/checkpoint) → rootfs diff while still frozen (the overlay snapshot's upper dir
read directly; other snapshotters through containerd's Diff service) → Tasks.Resume (whenever the task is
still there and paused) → spec.dump, config.dump → manifest.json last, rename (store_layout.py).
Whatever fails, the task is resumed and the temp dir removed; a full store is said to be full.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf import any_pb2

from kybernate.api import containerd_api_pb2 as pb
from kybernate.api import runc_options_pb2, task_pb2
from kybernate.hooks.api import store as store_layout
from kybernate.hooks.api.checkpoint import CHECKPOINT_OPTIONS_TYPE
from kybernate.hooks.api.store import Identity, Pending, Store, StoreError
from kybernate.hooks.containerd.client import ContainerdClient, ContainerdError, container_spec
from kybernate.shim.manager import group_id, socket_address, spec_annotations

NAMESPACE_KEY = "containerd-namespace-ttrpc"
TASK_SERVICE = "containerd.task.v2.Task"  # our shim serves v2 and v3 alike and renames for its child
GPU_MANIFEST = "kybernate.json"
# How long containerd may take to record the exit of a task dumped without --leave-running.
EXIT_SETTLE_S = 5.0
OPAQUE_XATTR = "trusted.overlay.opaque"
_CRI_NAME_PARTS = (
    "io.kubernetes.cri.container-name",
    "io.kubernetes.cri.sandbox-name",
    "io.kubernetes.cri.sandbox-namespace",
    "io.kubernetes.cri.sandbox-uid",
)


class CheckpointFailed(StoreError):
    """The checkpoint did not complete; the message says which step failed and that the task runs on."""


@dataclass
class Timings:
    """Seconds per phase, for the progress lines, `--json` and the benchmark."""

    phases: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, step: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return step()
        finally:
            self.phases[name] = time.monotonic() - started


@dataclass(frozen=True)
class Result:
    generation: store_layout.Generation
    timings: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        m = self.generation.manifest
        return {"key": m.key, "generation": m.generation, "path": self.generation.path, "size": m.size,
                "files": len(m.files), "seconds": round(self.seconds, 4),
                "phases": {k: round(v, 4) for k, v in self.timings.items()}, "gpu": m.gpu}


def shim_addresses(containerd_address: str, namespace: str, spec: dict[str, Any], container_id: str) -> list[str]:
    """Where our shim for this container listens: the address containerd gave it, spelled as containerd
    spells its own (a bare path; tried also with unix:// since an operator may write either)."""
    group = group_id(spec, container_id)
    bare = containerd_address.removeprefix("unix://")
    return [socket_address(a, namespace, group) for a in (bare, "unix://" + bare)]


async def _shim_checkpoint(addresses: list[str], namespace: str, container_id: str, path: str, exit: bool,
                           timeout: float) -> None:
    from kybernate.shim.ttrpc.client import Client

    client = None
    tried = []
    for address in addresses:
        try:
            client = await Client.connect(address)
            break
        except OSError as err:
            tried.append(f"{address}: {err.strerror or err}")
    if client is None:
        raise CheckpointFailed(
            f"cannot reach the kybernate shim of {container_id!r} ({'; '.join(tried)}): is it running under "
            "the kybernate runtime, and is --address containerd's address as the shim was given it?")
    options = any_pb2.Any(type_url=CHECKPOINT_OPTIONS_TYPE,
                          value=runc_options_pb2.CheckpointOptions(exit=exit).SerializeToString())
    request = task_pb2.CheckpointTaskRequest(id=container_id, path=path, options=options)
    try:
        await client.call(TASK_SERVICE, "Checkpoint", request.SerializeToString(),
                          metadata=((NAMESPACE_KEY, namespace),), timeout=timeout,
                          timeout_nano=int(timeout * 1e9))
    finally:
        await client.close()


class StoreCheckpointer:
    def __init__(self, client: ContainerdClient, containerd_address: str, container_id: str, store: Store,
                 key: str | None, *, leave_running: bool, progress: Callable[[str], None],
                 timeout: float = 600.0) -> None:
        self.client = client
        self.containerd_address = containerd_address
        self.container_id = container_id
        self.store = store
        self.key = key
        self.leave_running = leave_running
        self.progress = progress
        self.timeout = timeout
        self.timings = Timings()
        self.known_parts: dict[str, dict[int, str]] = {}

    def run(self) -> Result:
        started = time.monotonic()
        cid = self.container_id
        container, _ = self._inspect()
        spec = _spec(container)
        key = store_layout.validate_key(self.key or _default_key(container, spec))
        pending = self.store.begin(key)
        try:
            self._checkpoint(container, spec, pending)
            self._dumps(container, spec, pending.temp)
            gpu = _gpu_summary(os.path.join(pending.temp, "checkpoint"))
        except BaseException as err:
            full = pending.is_full()
            pending.abort()
            if full and not isinstance(err, KeyboardInterrupt):
                raise store_layout.StoreFull(
                    f"checkpoint of {cid!r} failed: the store at {self.store.root} is full "
                    f"({store_layout.free_bytes(self.store.root)} bytes free); the partial checkpoint was "
                    f"removed and the container {self._now_state()}: {err}") from None
            raise
        identity = _identity(container, spec, self.client.namespace)
        generation = self.timings.timed("manifest", lambda: pending.commit(identity, gpu, self.known_parts))
        self.progress(f"stored {key}@{generation.number}: {store_layout.human(generation.manifest.size)} in "
                      f"{len(generation.manifest.files)} files at {generation.path} "
                      f"(hash + manifest {self.timings.phases['manifest']:.2f}s)")
        return Result(generation, dict(self.timings.phases), time.monotonic() - started)

    # ---- phases ----

    def _inspect(self) -> tuple[pb.ContainerRecord, pb.Process]:
        cid = self.container_id
        try:
            container = self.client.get_container(cid)
            task = self.client.get_task(cid)
        except ContainerdError as err:
            if err.not_found:
                raise CheckpointFailed(
                    f"container {cid!r} not found or not running in namespace {self.client.namespace!r} of "
                    f"{self.client.address} (use the full containerd/CRI container id)") from None
            raise CheckpointFailed(str(err)) from None
        if task.status != pb.STATUS_RUNNING:
            status = pb.Status.Name(task.status).removeprefix("STATUS_")
            raise CheckpointFailed(f"container {cid!r} is {status}: only running containers can be checkpointed")
        return container, task

    def _checkpoint(self, container: pb.ContainerRecord, spec: dict[str, Any], pending: Pending) -> None:
        cid = self.container_id
        images = os.path.join(pending.temp, "checkpoint")
        os.mkdir(images, 0o700)
        step = "pause"
        failure: BaseException | None = None
        try:
            self.timings.timed("pause", lambda: self.client.pause(cid))
            self.progress(f"paused ({self.timings.phases['pause']:.2f}s)")
            step = "checkpoint (GPU + CRIU dump into the store)"
            addresses = shim_addresses(self.containerd_address, self.client.namespace, spec, cid)
            with store_layout.PartHasher(pending.temp) as hasher:
                self.timings.timed("dump", lambda: asyncio.run(_shim_checkpoint(
                    addresses, self.client.namespace, cid, images, not self.leave_running, self.timeout)))
            self.known_parts = hasher.known
            self.progress(f"dumped into the store ({self.timings.phases['dump']:.2f}s, "
                          f"{store_layout.human(_tree_size(images))})")
            step = "rootfs diff"
            self.timings.timed("rootfs", lambda: self._rootfs_diff(container, pending.temp))
            self.progress(f"rootfs diff ({self.timings.phases['rootfs']:.2f}s)")
        except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001  (any failure: resume, then report it)
            failure = err
        finally:
            self.timings.timed("resume", self._resume_if_paused)
        if failure is not None:
            raise CheckpointFailed(f"{step} of container {cid!r} failed; the container {self._now_state()}: "
                                   f"{failure}") from None

    def _resume_if_paused(self) -> None:
        cid = self.container_id
        try:
            status = self.client.get_task(cid).status
        except ContainerdError as err:
            if err.not_found:
                self.progress("the task has exited (checkpoint without --leave-running)")
                return
            raise CheckpointFailed(f"cannot read the state of {cid!r} after the checkpoint: {err}") from None
        if status in (pb.STATUS_PAUSED, pb.STATUS_PAUSING):
            try:
                self.client.resume(cid)
            except ContainerdError as err:
                # After a dump without --leave-running containerd may still report PAUSED until the exit
                # event arrives; the resume then fails on a stopped container, which is the intended end.
                if not self.leave_running and self._exited_within(EXIT_SETTLE_S):
                    self.progress("the task has exited (checkpoint without --leave-running)")
                    return
                raise CheckpointFailed(
                    f"container {cid!r} could not be resumed after the checkpoint: {err}: resume it with "
                    f"`ctr -n {self.client.namespace} task resume {cid}`") from None
            self.progress("resumed")
        elif status == pb.STATUS_STOPPED:
            self.progress("the task has exited (checkpoint without --leave-running)")

    def _exited_within(self, seconds: float) -> bool:
        """Whether the task is stopped or gone, polling containerd for up to `seconds` (bounded)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.client.get_task(self.container_id).status == pb.STATUS_STOPPED:
                    return True
            except ContainerdError as err:
                if err.not_found:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _now_state(self) -> str:
        try:
            status = self.client.get_task(self.container_id).status
        except ContainerdError:
            return "state is unknown"
        return "runs on" if status == pb.STATUS_RUNNING else f"is {pb.Status.Name(status).removeprefix('STATUS_')}"

    def _rootfs_diff(self, container: pb.ContainerRecord, workdir: str) -> None:
        if not container.snapshot_key:
            return
        mounts = self.client.snapshot_mounts(container.snapshotter, container.snapshot_key)
        upper = _overlay_upperdir(mounts)
        if upper is not None:
            deleted = tar_upperdir(upper, os.path.join(workdir, "rootfs-diff.tar"))
        else:  # not overlay: containerd's Diff service (the diff blob only, leased and dropped)
            from .checkpoint_archive import Checkpointer, Progress

            helper = Checkpointer(self.client, self.container_id, os.path.join(workdir, "unused.tar"),
                                  Progress(quiet=True))
            lease = self.client.create_lease()
            try:
                blob = helper._diff_blob(container, lease)
                deleted = helper._copy_diff(blob, os.path.join(workdir, "rootfs-diff.tar")) if blob else []
            finally:
                self.client.delete_lease(lease)
        if deleted:
            with open(os.path.join(workdir, "deleted.files"), "w") as f:
                json.dump(deleted, f)

    def _dumps(self, container: pb.ContainerRecord, spec: dict[str, Any], workdir: str) -> None:
        config = {
            "id": container.id,
            "name": _container_name(container, spec),
            "rootfsImage": container.image, "rootfsImageRef": container.image, "rootfsImageName": container.image,
            "runtime": container.runtime.name,
            "createdTime": _rfc3339(container.created_at.ToDatetime(tzinfo=UTC)
                                    if container.created_at.seconds else datetime.fromtimestamp(0, UTC)),
            "checkpointedTime": _rfc3339(datetime.now(UTC)),
        }
        with open(os.path.join(workdir, "config.dump"), "w") as f:
            json.dump(config, f)
        with open(os.path.join(workdir, "spec.dump"), "w") as f:
            json.dump(spec, f)


def _overlay_upperdir(mounts: list[pb.Mount]) -> str | None:
    if len(mounts) != 1 or mounts[0].type != "overlay":
        return None
    for option in mounts[0].options:
        if option.startswith("upperdir="):
            return str(option).removeprefix("upperdir=")
    return None


def tar_upperdir(upper: str, target: str) -> list[str]:
    """The overlay upper dir as a plain tar; whiteouts (0/0 char devices) become the returned deleted paths.

    An opaque dir (the container replaced a whole image dir) is stored with its new content; files of the
    image's version it removed are kept on restore, as with containerd's diff (docs/store.md).
    """
    deleted: list[str] = []
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, upper)
                st = os.lstat(full)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    deleted.append("/" + rel)
                    continue
                if stat.S_ISSOCK(st.st_mode):
                    continue  # a socket cannot be archived; the process recreates it on restore
                tar.add(full, arcname=rel, recursive=False)
    return deleted


def _tree_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _spec(container: pb.ContainerRecord) -> dict[str, Any]:
    try:
        return container_spec(container)
    except ValueError as err:
        raise CheckpointFailed(str(err)) from None


def _container_name(container: pb.ContainerRecord, spec: dict[str, Any]) -> str:
    """CRI's `<container>_<pod>_<namespace>_<uid>_<attempt>` when the spec carries CRI's annotations."""
    notes = spec_annotations(spec)
    parts = [notes.get(key, "") for key in _CRI_NAME_PARTS]
    if parts[0]:
        return "_".join([*parts, "0"])
    return str(container.labels.get("io.kubernetes.container.name") or container.id)


def _default_key(container: pb.ContainerRecord, spec: dict[str, Any]) -> str:
    """`kybernate.io/checkpoint-key` when set, else `<pod>.<container>` for CRI containers, else the id."""
    notes = spec_annotations(spec)
    if notes.get("kybernate.io/checkpoint-key"):
        return notes["kybernate.io/checkpoint-key"]
    name, pod = notes.get(_CRI_NAME_PARTS[0]), notes.get(_CRI_NAME_PARTS[1])
    if name and pod:
        return f"{pod}.{name}"
    return str(container.id)


def _identity(container: pb.ContainerRecord, spec: dict[str, Any], namespace: str) -> Identity:
    notes = spec_annotations(spec)
    return Identity(container_id=container.id, container_name=notes.get(_CRI_NAME_PARTS[0], container.id),
                    namespace=namespace, image=container.image,
                    runtime=container.runtime.name, pod_name=notes.get(_CRI_NAME_PARTS[1], ""),
                    pod_namespace=notes.get(_CRI_NAME_PARTS[2], ""), pod_uid=notes.get(_CRI_NAME_PARTS[3], ""))


def _gpu_summary(images: str) -> dict[str, Any]:
    """GPUs, process count and VRAM of the GPU manifest the shim wrote, for manifest.json and `ls`."""
    try:
        with open(os.path.join(images, GPU_MANIFEST)) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {"unreadable": True}
    processes = data.get("processes") or []
    return {"gpus": [g.get("uuid", "") for g in data.get("gpus") or []], "processes": len(processes),
            "vram_bytes": sum(int(p.get("vram_bytes", 0)) for p in processes),
            "driver": data.get("driver_version", "")}


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
