"""One checkpoint of a running container straight into the store (hookd's Store.Checkpoint).

containerd's own checkpoint (ctr, CRI) has CRIU write into a temp dir and then copies the images into
containerd's content store, which costs far more than the dump at GPU sizes; and containerd 1.6's task
service passes a caller's image path on only to runtimes named `io.containerd.runc*`. So the dump is asked
of our shim directly (hooks/containerd/shim.py), with the store's temp dir as its image path.

Steps: Containers.Get + Tasks.Get (must be RUNNING) -> Store.begin (temp dir) -> Tasks.Pause through
containerd (containerd's view stays true; the shim checkpoints the GPU first) -> shim Checkpoint(path=
<temp>/checkpoint) -> rootfs diff while still frozen -> Tasks.Resume (whenever the task is still there and
paused) -> spec.dump, config.dump -> manifest.json last and the rename (hooks/api/store.py).

Whatever fails, the task is resumed and the temp dir removed; a full store is said to be full. The deadline
is checked before every step and bounds the dump (the shim cancels its handler when it passes); past it
the checkpoint is rolled back the same way and DEADLINE_EXCEEDED. One exception: once a dump without
leave_running has succeeded, the workload exists only in the temp dir, so it is always committed.

asyncio: every blocking call (containerd's gRPC, files, hashing) runs in the store's executor.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from kybernate.api import containerd_api_pb2 as pb
from kybernate.hooks.api import checkpoint_key, procfs
from kybernate.hooks.api import store as store_layout
from kybernate.hooks.api.checkpoint import CONFIG_DUMP, SPEC_DUMP
from kybernate.hooks.api.errors import Code, FailedPrecondition, InvalidRequest, KybernateError
from kybernate.hooks.api.model import StoreProgress
from kybernate.hooks.api.store import Generation, Identity, Pending, Store
from kybernate.hooks.containerd import rootfs
from kybernate.hooks.containerd.client import ContainerdClient, ContainerdError, container_spec
from kybernate.hooks.containerd.shim import (
    ShimCallFailed,
    ShimUnreachable,
    shim_addresses,
    shim_checkpoint,
    shim_hibernate,
    shim_wake,
    spec_annotations,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
GPU_MANIFEST = "kybernate.json"
# How long containerd may take to record the exit of a task dumped without leave_running.
EXIT_SETTLE_S = 5.0
# How often the dump's progress (bytes written so far) is reported.
DUMP_PROGRESS_S = 0.5
# Seconds a resume after a failure or a deadline may take: it runs whatever the deadline says.
RESUME_TIMEOUT_S = 60.0
_CRI_NAME_PARTS = (
    "io.kubernetes.cri.container-name",
    "io.kubernetes.cri.sandbox-name",
    "io.kubernetes.cri.sandbox-namespace",
    "io.kubernetes.cri.sandbox-uid",
)

Emit = Callable[[StoreProgress], None]


class ContainerNotFound(KybernateError):
    """No such container, or it has no task."""

    code = Code.NOT_FOUND


class CheckpointFailed(KybernateError):
    """A step failed (GPU, CRIU, rootfs diff); the task was resumed and nothing half-written is left."""

    code = Code.ABORTED


class CheckpointDeadline(KybernateError):
    """The checkpoint could not finish within its deadline; it was rolled back."""

    code = Code.DEADLINE_EXCEEDED


class StoreFullError(KybernateError):
    """The store's filesystem is full; the partial checkpoint was removed and the task runs on."""

    code = Code.RESOURCE_EXHAUSTED


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    namespace: str
    container_id: str
    key: str
    leave_running: bool
    deadline_s: float  # seconds from now
    reason: str = "cli"
    # Hibernate (standby's disk tier): the shim's Hibernate instead of Pause + Checkpoint; no resume; the task
    # stays containerd's (RUNNING, or PAUSED when it was RAM-parked) while its processes are gone. A failure
    # after the dump wakes it from the temp dir's images before the temp dir goes.
    hibernate: bool = False


@dataclass(frozen=True, slots=True)
class Outcome:
    generation: Generation
    pause_s: float  # how long the workload was frozen (until resumed, or until it exited after the dump)
    total_s: float
    phase_s: dict[str, float]


@dataclass
class _Deadline:
    at: float  # loop time

    def left(self) -> float:
        return self.at - asyncio.get_running_loop().time()


@dataclass
class _State:
    phases: dict[str, float] = field(default_factory=dict)
    paused_at: float | None = None
    pause_s: float = 0.0
    exited: bool = False  # a dump without leave_running succeeded: the workload lives only in the temp dir
    known_parts: dict[str, dict[int, str]] = field(default_factory=dict)


class StoreCheckpoint:
    """One checkpoint; `run()` once."""

    def __init__(self, request: CheckpointRequest, store: Store, containerd_address: str, executor: Executor,
                 emit: Emit) -> None:
        self.request = request
        self.store = store
        self.containerd_address = containerd_address
        self.executor = executor
        self.emit = emit
        self.state = _State()
        self.cid = request.container_id
        self.pid = 0
        self.dump_estimate = 0

    async def run(self) -> Outcome:
        r = self.request
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = _Deadline(started + r.deadline_s)
        key = validate(r)  # "" until the container's spec names it (checkpoint_key.key_for)
        address = self.containerd_address.removeprefix("unix://")
        client = ContainerdClient(address, r.namespace, timeout=max(1.0, r.deadline_s))
        # State reads and the resume run whatever the deadline says, each bounded on its own.
        self.quick = ContainerdClient(address, r.namespace, timeout=RESUME_TIMEOUT_S)
        try:
            container, self.pid = await self._blocking(self._inspect, client)
            spec = _spec(container)
            key = key or _default_key(spec, r.namespace, self.cid)
            pending = await self._blocking(self.store.begin, key)
            try:
                if r.hibernate:
                    await self._hibernate(client, container, spec, pending)
                else:
                    await self._freeze_and_dump(client, container, spec, pending, deadline)
                await self._blocking(_write_dumps, container, spec, pending.temp)
                gpu = _gpu_summary(os.path.join(pending.temp, "checkpoint"))
                if not self.state.exited:
                    self._check(deadline, "manifest")
            except BaseException as err:
                full = await self._blocking(pending.is_full)
                if r.hibernate and self.state.exited:
                    await self._wake_back(spec, os.path.join(pending.temp, "checkpoint"), err)
                await self._blocking(pending.abort)
                if full:
                    raise StoreFullError(
                        f"checkpoint of {self.cid!r} failed: the store at {self.store.root} is full "
                        f"({store_layout.free_bytes(self.store.root)} bytes free); the partial checkpoint was "
                        f"removed and the container {await self._now_state(self.quick)}: {_message(err)}") from None
                raise
            identity = _identity(container, spec, r.namespace)
            self.emit(StoreProgress("manifest", 0, _tree_size(pending.temp)))
            try:
                generation = await self._timed("manifest", self._blocking(
                    pending.commit, identity, gpu, self.state.known_parts))
            except BaseException as err:
                if r.hibernate:  # the images are still in the temp dir (commit failed before its rename)
                    await self._wake_back(spec, os.path.join(pending.temp, "checkpoint"), err)
                    await self._blocking(pending.abort)
                raise
        finally:
            client.close()
            self.quick.close()
        total = loop.time() - started
        log.info("store checkpoint committed", extra={"fields": {
            "container": self.cid, "key": key, "generation": generation.number, "bytes": generation.manifest.size,
            "pause_s": round(self.state.pause_s, 3), "total_s": round(total, 3), "reason": r.reason}})
        return Outcome(generation, self.state.pause_s, total, dict(self.state.phases))

    # ---- steps ----

    def _inspect(self, client: ContainerdClient) -> tuple[pb.ContainerRecord, int]:
        cid = self.cid
        try:
            container = client.get_container(cid)
            task = client.get_task(cid)
        except ContainerdError as err:
            if err.not_found:
                raise ContainerNotFound(
                    f"container {cid!r} not found or not running in namespace {client.namespace!r} of "
                    f"{client.address} (use the full containerd/CRI container id)") from None
            raise CheckpointFailed(f"cannot inspect container {cid!r}: {err}") from None
        allowed = (pb.STATUS_RUNNING, pb.STATUS_PAUSED) if self.request.hibernate else (pb.STATUS_RUNNING,)
        if task.status not in allowed:
            status = pb.Status.Name(task.status).removeprefix("STATUS_")
            raise FailedPrecondition(f"container {cid!r} is {status}: only running containers can be checkpointed")
        return container, int(task.pid)

    async def _freeze_and_dump(self, client: ContainerdClient, container: pb.ContainerRecord, spec: dict[str, Any],
                               pending: Pending, deadline: _Deadline) -> None:
        loop = asyncio.get_running_loop()
        images = os.path.join(pending.temp, "checkpoint")
        await self._blocking(os.mkdir, images, 0o700)
        step = "pause"
        failure: BaseException | None = None
        try:
            self._check(deadline, "pause")
            self.emit(StoreProgress("pause"))
            self.state.paused_at = loop.time()
            # The shim checkpoints the GPU before it freezes the task (its Pause), as for every pause.
            await self._timed("pause", self._blocking(client.pause, self.cid))
            # Frozen, with the GPU state in host memory: what CRIU is about to write, for the dump's ETA.
            self.dump_estimate = await self._blocking(estimate_dump_bytes, self.pid)
            self._check(deadline, "dump")
            step = "checkpoint (GPU + CRIU dump into the store)"
            await self._timed("dump", self._dump(client, spec, images, deadline))
            self.state.exited = not self.request.leave_running
            if not self.state.exited:
                self._check(deadline, "rootfs")
            step = "rootfs diff"
            self.emit(StoreProgress("rootfs"))
            await self._timed("rootfs", self._rootfs(client, container, pending.temp, deadline))
        except (Exception, asyncio.CancelledError) as err:  # any failure: resume, then report it
            failure = err
        finally:
            self.emit(StoreProgress("resume"))
            await self._timed("resume", self._blocking(self._resume_if_paused, self.quick))
            if self.state.paused_at is not None:
                self.state.pause_s = loop.time() - self.state.paused_at
        if failure is None:
            return
        if isinstance(failure, asyncio.CancelledError):
            raise failure
        if isinstance(failure, CheckpointDeadline) or deadline.left() <= 0 or _deadline_error(failure):
            # A step cut short by the deadline (containerd and the shim pass it on) reads as the deadline.
            why = failure.message if isinstance(failure, CheckpointDeadline) else (
                f"the {step} of {self.cid!r} did not finish within the checkpoint's deadline "
                f"({self.request.deadline_s:g} s): {_message(failure)}")
            raise CheckpointDeadline(f"{why}; it was rolled back and the container "
                                     f"{await self._now_state(self.quick)}") from None
        if isinstance(failure, KybernateError) and not isinstance(failure, CheckpointFailed):
            raise failure
        raise CheckpointFailed(f"{step} of container {self.cid!r} failed; the container "
                               f"{await self._now_state(self.quick)}: {_message(failure)}") from None

    async def _hibernate(self, client: ContainerdClient, container: pb.ContainerRecord, spec: dict[str, Any],
                         pending: Pending) -> None:
        """The shim's Hibernate into the temp dir (it rolls the task back itself when it fails), then the rootfs
        diff (the snapshot's upper dir; the processes are gone, nothing changes it). No deadline past the dump:
        the workload lives in the temp dir now."""
        images = os.path.join(pending.temp, "checkpoint")
        await self._blocking(os.mkdir, images, 0o700)
        self.dump_estimate = await self._blocking(estimate_dump_bytes, self.pid)
        addresses = shim_addresses(self.containerd_address, client.namespace, spec, self.cid)
        hasher = store_layout.PartHasher(os.path.dirname(images))
        hasher.__enter__()
        reporter = asyncio.create_task(self._report_dump(images))
        try:
            reply = await self._timed("dump", shim_hibernate(addresses, client.namespace, self.cid, images,
                                                             timeout=max(1.0, self.request.deadline_s)))
        except ShimCallFailed as err:
            raise CheckpointFailed(f"the hibernate of {self.cid!r} failed; the container "
                                   f"{await self._now_state(self.quick)}: {err.code.name}: {err.message}") from None
        except ShimUnreachable as err:
            raise CheckpointFailed(str(err)) from None
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            await self._blocking(hasher.__exit__, None, None, None)
        self.state.exited = True
        self.state.pause_s = reply.dump_s
        self.state.phases["runc_dump"] = reply.runc_dump_s
        log.info("hibernated", extra={"fields": {"container": self.cid, "dump_s": round(reply.dump_s, 3),
                                                 "runc_dump_s": round(reply.runc_dump_s, 3),
                                                 "shim_s": round(reply.total_s, 3), "was_paused": reply.was_paused}})
        self.state.known_parts = hasher.known
        written = await self._blocking(_tree_size, images)
        self.emit(StoreProgress("dump", written, written))
        self.emit(StoreProgress("rootfs"))
        await self._timed("rootfs", self._rootfs(client, container, pending.temp, _Deadline(float("inf"))))

    async def _wake_back(self, spec: dict[str, Any], images: str, err: BaseException) -> None:
        """A hibernate whose generation cannot be completed: the task comes back from the temp dir's images."""
        addresses = shim_addresses(self.containerd_address, self.request.namespace, spec, self.cid)
        try:
            await shim_wake(addresses, self.request.namespace, self.cid, images, timeout=RESUME_TIMEOUT_S)
            log.warning("hibernate not committed; the workload was woken from its images", extra={"fields": {
                "container": self.cid, "error": _message(err)}})
        except (ShimCallFailed, ShimUnreachable) as wake_err:
            # The images must not go: the task is hibernated (containerd sees it RUNNING) and they are all of it.
            self.state.exited = False
            log.error("hibernate not committed and the wake from its images failed; the images stay", extra={
                "fields": {"container": self.cid, "images": images, "error": str(wake_err)}})
            raise CheckpointFailed(f"the hibernate of {self.cid!r} could not be committed ({_message(err)}) and "
                                   f"the wake from its images failed ({wake_err}); the images stay in {images}: "
                                   "wake it with them (shim Wake) or stop the container") from None

    async def _dump(self, client: ContainerdClient, spec: dict[str, Any], images: str, deadline: _Deadline) -> None:
        addresses = shim_addresses(self.containerd_address, client.namespace, spec, self.cid)
        hasher = store_layout.PartHasher(os.path.dirname(images))
        hasher.__enter__()
        reporter = asyncio.create_task(self._report_dump(images))
        try:
            await shim_checkpoint(addresses, client.namespace, self.cid, images, exit=not self.request.leave_running,
                                  timeout=max(0.001, deadline.left()))
        except ShimCallFailed as err:
            if err.code == Code.DEADLINE_EXCEEDED:
                raise CheckpointDeadline(f"the dump of {self.cid!r} did not finish within the deadline "
                                         f"({self.request.deadline_s:g} s)") from None
            raise CheckpointFailed(f"the shim's checkpoint failed: {err.code.name}: {err.message}") from None
        except ShimUnreachable as err:
            raise CheckpointFailed(str(err)) from None
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            await self._blocking(hasher.__exit__, None, None, None)
        self.state.known_parts = hasher.known
        written = await self._blocking(_tree_size, images)
        self.emit(StoreProgress("dump", written, written))

    async def _report_dump(self, images: str) -> None:
        while True:
            written = await self._blocking(_tree_size, images)
            self.emit(StoreProgress("dump", written, max(written, self.dump_estimate)))
            await asyncio.sleep(DUMP_PROGRESS_S)

    async def _rootfs(self, client: ContainerdClient, container: pb.ContainerRecord, workdir: str,
                      deadline: _Deadline) -> None:
        cancelled = threading.Event()
        work = asyncio.ensure_future(self._blocking(functools.partial(
            rootfs.write_rootfs_diff, client, container, workdir, warn=self._warn, cancelled=cancelled)))
        if self.state.exited:  # the workload lives only here now: no deadline cuts it short
            size = await work
        else:
            try:
                size = await asyncio.wait_for(asyncio.shield(work), max(0.001, deadline.left()))
            except TimeoutError:
                cancelled.set()
                await asyncio.gather(work, return_exceptions=True)  # the thread stops at the next entry
                raise CheckpointDeadline(f"the rootfs diff of {self.cid!r} did not finish within the deadline "
                                         f"({self.request.deadline_s:g} s)") from None
        self.emit(StoreProgress("rootfs", size, size))

    def _resume_if_paused(self, client: ContainerdClient) -> None:
        """Blocking. The task is resumed whenever it is still there and paused, whatever happened before."""
        cid = self.cid
        try:
            status = client.get_task(cid).status
        except ContainerdError as err:
            if err.not_found:
                return  # exited after a dump without leave_running
            raise CheckpointFailed(f"cannot read the state of {cid!r} after the checkpoint: {err}") from None
        if status not in (pb.STATUS_PAUSED, pb.STATUS_PAUSING):
            return
        try:
            client.resume(cid)
        except ContainerdError as err:
            # After a dump without leave_running containerd may still report PAUSED until the exit event
            # arrives; the resume then fails on a stopped container, which is the intended end.
            if not self.request.leave_running and self._exited_within(client, EXIT_SETTLE_S):
                return
            raise CheckpointFailed(
                f"container {cid!r} could not be resumed after the checkpoint: {err}: resume it with "
                f"`ctr -n {client.namespace} task resume {cid}`") from None

    def _exited_within(self, client: ContainerdClient, seconds: float) -> bool:
        """Blocking: whether the task is stopped or gone, polling containerd for up to `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if client.get_task(self.cid).status == pb.STATUS_STOPPED:
                    return True
            except ContainerdError as err:
                if err.not_found:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    async def _now_state(self, client: ContainerdClient) -> str:
        try:
            status = (await self._blocking(client.get_task, self.cid)).status
        except ContainerdError:
            return "state is unknown"
        return "runs on" if status == pb.STATUS_RUNNING else f"is {pb.Status.Name(status).removeprefix('STATUS_')}"

    # ---- helpers ----

    def _check(self, deadline: _Deadline, step: str) -> None:
        if deadline.left() <= 0:
            raise CheckpointDeadline(f"the checkpoint of {self.cid!r} did not finish within its deadline "
                                     f"({self.request.deadline_s:g} s) before the {step} step")

    def _warn(self, message: str) -> None:
        log.warning("store checkpoint", extra={"fields": {"container": self.cid, "warning": message}})

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))

    async def _timed(self, name: str, work: Any) -> Any:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            return await work
        finally:
            self.state.phases[name] = loop.time() - started


def validate(request: CheckpointRequest) -> str:
    """The request's key, checked (InvalidRequest, store.BadKey) before anything is touched."""
    if not request.container_id:
        raise InvalidRequest("a container id is required")
    if not request.key:
        return ""  # the container's own key, from its spec once it is read (_default_key)
    return store_layout.validate_key(request.key)


def _deadline_error(err: BaseException) -> bool:
    """containerd answered DEADLINE_EXCEEDED: the checkpoint's deadline, passed on to containerd and the shim."""
    return isinstance(err, ContainerdError) and err.code is not None and err.code.name == "DEADLINE_EXCEEDED"


def _message(err: BaseException) -> str:
    return err.message if isinstance(err, KybernateError) else str(err) or type(err).__name__


def _write_dumps(container: pb.ContainerRecord, spec: dict[str, Any], workdir: str) -> None:
    """config.dump (checkpointctl's fields) and spec.dump, as a CRI checkpoint archive has them."""
    config = {
        "id": container.id,
        "name": _container_name(container, spec),
        "rootfsImage": container.image, "rootfsImageRef": container.image, "rootfsImageName": container.image,
        "runtime": container.runtime.name,
        "createdTime": _rfc3339(container.created_at.ToDatetime(tzinfo=UTC)
                                if container.created_at.seconds else datetime.fromtimestamp(0, UTC)),
        "checkpointedTime": _rfc3339(datetime.now(UTC)),
    }
    with open(os.path.join(workdir, CONFIG_DUMP), "w") as f:
        json.dump(config, f)
    with open(os.path.join(workdir, SPEC_DUMP), "w") as f:
        json.dump(spec, f)


def estimate_dump_bytes(pid: int) -> int:
    """Resident anonymous and shared memory of every process in `pid`'s cgroup: roughly the pages CRIU dumps
    (a progress estimate only; 0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
        path = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        pids = procfs.pids_of_cgroup(path)
    except (OSError, StopIteration, ValueError, KybernateError):
        pids = [pid]
    total = 0
    for p in pids or [pid]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssShmem:")):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


def _tree_size(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                continue  # written and removed while we walked (CRIU's temp files)
    return total


def _default_key(spec: dict[str, Any], namespace: str, container_id: str) -> str:
    """The workload's key when the request names none: its kybernate.io/checkpoint-key, else the default
    (docs/resilience.md), exactly as the shim computes it for checkpoint-on-stop and resume: latest."""
    try:
        return checkpoint_key.key_for(spec_annotations(spec), namespace, container_id)
    except store_layout.BadKey as err:
        raise InvalidRequest(f"the container's {checkpoint_key.ANNOTATION} cannot be a store key: {err}") from None


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
