"""GpuManager: finds a container's CUDA processes and walks them through the driver's state machine.

    RUNNING --lock--> LOCKED --checkpoint--> CHECKPOINTED --restore--> LOCKED --unlock--> RUNNING

Per request, every process runs its own sequence of steps as a task of its own, all in parallel
(the driver steps are CPU-bound per target and scale across processes). Rules:

- Idempotent: a process already LOCKED or CHECKPOINTED continues from there; RUNNING is done for
  a restore.
- All or nothing for a checkpoint: when one process fails, every process this request changed is
  put back (restore + unlock), so the container is left as it was.
- Never call the driver on a stopped or cgroup-frozen process: the driver blocks until it runs
  again, whatever lock timeout it was given (measured on driver 580). Such requests are refused.
- Every driver call has a bound. A call that overruns it keeps running in its thread; the request
  fails now and the process is "pending" until the call returns, when it is put back (settled).
- A caller that goes away mid-request does not leave things half done: running steps finish, and
  a checkpoint is then rolled back.
- Requests for one container are serialised; different containers proceed in parallel.
- Bounded: a request names at most `max_pids_per_request` pids; at most `max_parallel` driver calls
  run on the node and `max_parallel_per_request` for one request, so one container cannot starve
  another (the other waits for one driver call, not for the whole container).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NoReturn, TypeVar

from kybernate.hooks.api import procfs
from kybernate.hooks.api.errors import (
    FailedPrecondition,
    InheritedDropFailed,
    InsufficientVram,
    InvalidRequest,
    KybernateError,
    LockTimeout,
    NoMatchingGpu,
    ProcessBusy,
    ProcessPaused,
    RollbackFailed,
    StepFailed,
    TooLarge,
)
from kybernate.hooks.api.model import (
    CheckpointResult,
    GpuDeviceRecord,
    GpuManifest,
    GpuPair,
    GpuProcessRecord,
    HealthInfo,
    InheritedDrop,
    NodeGpu,
    ProcessOutcome,
    ProcessStatus,
    RestoreResult,
    StepTiming,
)
from kybernate.hooks.gpu import inherited
from kybernate.hooks.gpu.blocking import StillRunning, run_blocking
from kybernate.hooks.gpu.cuda import NOT_A_CUDA_PROCESS, CheckpointDriver, CudaError, CudaState, normalize_uuid
from kybernate.hooks.gpu.nvml import Inventory, Nvml

from .gpu_override import GpuOverrides
from .metrics import STEPS, Metrics
from .settings import ManagerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
GiB = float(1 << 30)
# Manifests remembered for containers checkpointed and never restored here (a checkpoint that exited
# the container, restored elsewhere): bounded, oldest forgotten first.
REMEMBERED_MANIFESTS = 1024
# Longest namespace or container id, and cgroup path, a request may give (bytes): containerd's ids
# are at most 76 bytes, PATH_MAX is 4096.
MAX_NAME_BYTES = 256
MAX_PATH_BYTES = 4096
# The driver-call slots of the request this task works for (set by _container; tasks a request starts
# inherit it). None outside a request (GpuStatus, the settling of a late call): the node's cap only.
_REQUEST_SLOTS: contextvars.ContextVar[asyncio.Semaphore | None] = contextvars.ContextVar("request_slots",
                                                                                          default=None)


@dataclass(frozen=True, slots=True)
class ContainerRef:
    namespace: str
    container_id: str
    pids: tuple[int, ...] = ()
    cgroup_path: str = ""

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.container_id}"


@dataclass(slots=True)
class _Pending:
    """A driver call that overran its bound and has not returned yet."""

    step: str
    since: float  # time.monotonic()


async def _wait_all(tasks: Collection[asyncio.Task[Any]]) -> bool:
    """Wait until every task is done even if the caller is cancelled meanwhile; True if it was."""
    cancelled = False
    pending = set(tasks)
    while pending:
        try:
            _, pending = await asyncio.wait(pending)  # never cancels the tasks themselves
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


def plan_gpu_pairs(checkpointed: Sequence[GpuDeviceRecord], node: Sequence[NodeGpu],
                   gpu_map: Mapping[str, str]) -> list[GpuPair]:
    """Old GPU -> new GPU for every checkpointed GPU: gpu_map first, then the same UUID if this node has
    it, then the remaining GPUs of the same model in index order."""
    by_uuid = {normalize_uuid(g.uuid): g for g in node}
    wanted = {normalize_uuid(k): normalize_uuid(v) for k, v in gpu_map.items()}
    olds = [normalize_uuid(g.uuid) for g in checkpointed]
    unknown = set(wanted) - set(olds)
    if unknown:
        log.warning("gpu_map names GPUs the checkpoint did not use; ignored",
                    extra={"fields": {"gpus": sorted(unknown)}})
    chosen: dict[str, str] = {}
    taken: set[str] = set()
    for old in olds:
        new = wanted.get(old)
        if new is None:
            continue
        if new not in by_uuid:
            raise NoMatchingGpu(f"gpu_map sends {old} to {new}, which this node does not have "
                                f"(it has {', '.join(sorted(by_uuid)) or 'no GPU'})")
        if new in taken:
            raise InvalidRequest(f"gpu_map sends two checkpointed GPUs to {new}")
        chosen[old] = new
        taken.add(new)
    for old in olds:
        if old not in chosen and old in by_uuid and old not in taken:
            chosen[old] = old
            taken.add(old)
    for record, old in zip(checkpointed, olds, strict=True):
        if old in chosen:
            continue
        same_model = [g for g in sorted(node, key=lambda g: g.index)
                      if g.name == record.name and normalize_uuid(g.uuid) not in taken]
        if not same_model:
            raise NoMatchingGpu(
                f"checkpointed GPU {old} ({record.name or 'unknown model'}) has no counterpart here: no GPU with "
                f"that UUID and no unused {record.name or 'GPU of that model'}; pass gpu_map to choose one"
            )
        chosen[old] = normalize_uuid(same_model[0].uuid)
        taken.add(chosen[old])
    return [GpuPair(old, chosen[old]) for old in olds]


class GpuManager:
    def __init__(self, driver: CheckpointDriver, nvml: Nvml, settings: ManagerSettings, metrics: Metrics,
                 executor: Executor) -> None:
        self._driver = driver
        self._nvml = nvml
        self._settings = settings
        self._metrics = metrics
        self._executor = executor
        # One request at a time per container: a lock lives while a request holds or waits for it.
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
        # Each container's last checkpoint until a restore completes; the least recently checkpointed go first.
        self._manifests: OrderedDict[tuple[str, str], GpuManifest] = OrderedDict()
        self._pending: dict[int, _Pending] = {}
        self._settling: set[asyncio.Task[None]] = set()
        self._ops: dict[int, tuple[str, float]] = {}  # id(request) -> (what, since) for the stop log
        self._node_slots = asyncio.Semaphore(settings.max_parallel)  # driver calls on the node
        self.overrides = GpuOverrides()  # GPU pairs the standby controller sets for a wake onto another GPU

    # ---- public: one method per RPC ----------------------------------------------------------

    async def checkpoint(self, ref: ContainerRef, lock_timeout_ms: int = 0) -> CheckpointResult:
        timeout_ms = lock_timeout_ms or self._settings.default_lock_timeout_ms
        async with self._container(ref, "checkpoint") as key:
            pids = self._pids(ref)
            inventory = await self._inventory()
            states, not_cuda = await self._discover(pids)
            self._cross_check(ref, states, not_cuda, inventory)
            if not states:
                return CheckpointResult(self._manifest({}, inventory, None, {}))
            _refuse_unusable(ref, states, "checkpointed")
            usage_before = inventory.usage_of(states) if inventory else {}
            # Forked children's inherited GPU device files: found now, while the CUDA processes still hold
            # theirs (to tell inherited descriptors from opened ones); dropped once those are checkpointed.
            holders = inherited.find_holders(not_cuda, states)
            inherited.refuse_paused(ref.name, holders)
            tasks = {pid: asyncio.create_task(self._checkpoint_one(pid, state, timeout_ms), name=f"checkpoint-{pid}")
                     for pid, state in states.items()}
            cancelled = await _wait_all(tasks.values())
            failures: dict[int, BaseException | None] = {
                pid: t.exception() for pid, t in tasks.items() if t.exception() is not None}
            dropped: tuple[InheritedDrop, ...] = ()
            if not failures and not cancelled:
                # Forked children's inherited files, and what the driver left mapped in the CUDA processes.
                holders += inherited.find_residue(states)
            if holders and not failures and not cancelled:
                try:
                    dropped = await inherited.drop_all(ref.name, holders, self._executor,
                                                       self._settings.inherited_timeout_s)
                except InheritedDropFailed as err:
                    failures = {err.pid or 0: err}
                except asyncio.CancelledError:
                    cancelled = True
            if failures or cancelled:
                await self._undo_checkpoint(ref, states, failures, cancelled)
            outcomes = tuple(tasks[pid].result() for pid in sorted(tasks))
            manifest = replace(self._manifest(states, inventory, self._manifests.get(key), usage_before),
                               dropped_inherited=dropped)
            self._remember(key, manifest)
            self._metrics.moved("device_to_host", sum(
                p.vram_bytes for p in manifest.processes if states.get(p.pid) != CudaState.CHECKPOINTED))
            log.info("checkpointed", extra={"fields": {"container": ref.name, "processes": len(outcomes),
                                                       "vram_gib": round(manifest.vram_bytes / GiB, 3),
                                                       "dropped_inherited": ",".join(str(d.pid) for d in dropped)}})
            return CheckpointResult(manifest, outcomes)

    async def restore(self, ref: ContainerRef, manifest: GpuManifest | None = None,
                      gpu_map: Mapping[str, str] | None = None) -> RestoreResult:
        override = self.overrides.get((ref.namespace, ref.container_id))
        if override is None:
            return await self._restore(ref, manifest, gpu_map)
        # A standby wake onto another GPU (gpu_override.py): its pairs win over the request's for those GPUs.
        override.used = True
        try:
            return await self._restore(ref, manifest, {**_valid_gpu_map(gpu_map or {}), **override.pairs})
        except KybernateError as err:
            override.error, override.driver_error = err.message, err.driver_error or ""
            raise

    async def _restore(self, ref: ContainerRef, manifest: GpuManifest | None,
                       gpu_map: Mapping[str, str] | None) -> RestoreResult:
        gpu_map = _valid_gpu_map(gpu_map or {})
        async with self._container(ref, "restore") as key:
            pids = self._pids(ref)
            states, _ = await self._discover(pids)
            _refuse_unusable(ref, states, "restored")
            todo = {pid: s for pid, s in states.items() if s in (CudaState.CHECKPOINTED, CudaState.LOCKED)}
            if not todo:
                self._manifests.pop(key, None)
                return RestoreResult(tuple(ProcessOutcome(pid, s.name, s.name) for pid, s in sorted(states.items())))
            if manifest is None or manifest.empty:
                manifest = self._manifests.get(key)  # what this daemon remembers of the container's last checkpoint
            pairs: list[GpuPair] = []
            if any(s == CudaState.CHECKPOINTED for s in todo.values()):
                pairs = await self._plan_restore(ref, pids, manifest, gpu_map)
            remapped = any(p.old_uuid != p.new_uuid for p in pairs)
            # The driver wants pairs covering every checkpointed GPU, and only when they change something.
            driver_pairs = [(p.old_uuid, p.new_uuid) for p in pairs] if remapped else []
            tasks = {pid: asyncio.create_task(self._restore_one(pid, state, driver_pairs), name=f"restore-{pid}")
                     for pid, state in todo.items()}
            cancelled = await _wait_all(tasks.values())
            failures = {pid: t.exception() for pid, t in tasks.items() if t.exception() is not None}
            if failures:
                raise self._restore_failure(ref, todo, failures)
            if cancelled:
                raise asyncio.CancelledError
            outcomes = {pid: t.result() for pid, t in tasks.items()}
            outcomes.update({pid: ProcessOutcome(pid, s.name, s.name) for pid, s in states.items() if pid not in todo})
            if manifest is not None:
                self._metrics.moved("host_to_device", manifest.vram_bytes)
            self._manifests.pop(key, None)
            log.info("restored", extra={"fields": {"container": ref.name, "processes": len(todo), "remapped": remapped,
                                                   "pairs": ",".join(f"{p.old_uuid}={p.new_uuid}" for p in pairs)}})
            return RestoreResult(tuple(outcomes[pid] for pid in sorted(outcomes)), tuple(pairs), remapped)

    async def status(self, ref: ContainerRef) -> list[ProcessStatus]:
        pids = self._pids(ref)
        inventory = await self._inventory()
        usage = inventory.usage_of(pids) if inventory else {}
        last = self._manifests.get((ref.namespace, ref.container_id))
        remembered = {p.pid: p for p in last.processes} if last else {}
        out: list[ProcessStatus] = []
        for pid in pids:
            pending = self._pending.get(pid)
            if pending is not None:
                out.append(ProcessStatus(pid, "", note=f"driver {pending.step} pending for "
                                                       f"{time.monotonic() - pending.since:.1f} s"))
                continue
            try:
                state, _ = await self._call(pid, "get_state", self._driver.get_state,
                                            timeout_s=self._settings.query_timeout_s)
            except ProcessPaused as err:
                out.append(ProcessStatus(pid, "", note=err.message))
                continue
            except StepFailed as err:
                if err.driver_error in NOT_A_CUDA_PROCESS:
                    continue
                out.append(ProcessStatus(pid, "", note=err.driver_error or err.message))
                continue
            uses = usage.get(pid, [])
            if not uses and pid in remembered:  # checkpointed: NVML no longer lists it
                r = remembered[pid]
                out.append(ProcessStatus(pid, state.name, r.gpu_uuids, r.vram_bytes, note="as of the last checkpoint"))
                continue
            out.append(ProcessStatus(pid, state.name, tuple(sorted({u.gpu_uuid for u in uses})),
                                     sum(u.used_bytes for u in uses)))
        return out

    async def health(self) -> HealthInfo:
        inventory = await self._inventory()
        driver_version = inventory.driver_version if inventory else str(getattr(self._driver, "driver_version", ""))
        return HealthInfo(
            driver_version=driver_version or _cuda_text(self._driver.cuda_version),
            backend=self._driver.backend,
            cuda_version=self._driver.cuda_version,
            nvml=inventory is not None,
            gpus=inventory.gpus if inventory else (),
        )

    def busy(self) -> list[str]:
        """What is still going on, for the log of a daemon that is stopping."""
        now = time.monotonic()
        out = [f"{what} for {now - since:.1f} s" for what, since in self._ops.values()]
        out += [f"driver {p.step} on pid {pid} pending for {now - p.since:.1f} s" for pid, p in self._pending.items()]
        return out

    async def wait_settled(self) -> None:
        """Wait for the background tasks that put processes back after late driver calls."""
        while self._settling:
            await asyncio.wait(set(self._settling))

    # ---- per process ---------------------------------------------------------------------------

    async def _checkpoint_one(self, pid: int, before: CudaState, timeout_ms: int) -> ProcessOutcome:
        steps: list[StepTiming] = []
        state = before
        if state == CudaState.RUNNING:
            _, seconds = await self._call(pid, "lock", self._driver.lock, timeout_ms,
                                          timeout_s=timeout_ms / 1000 + self._settings.lock_grace_s,
                                          settle_to=CudaState.RUNNING, lock_timeout_ms=timeout_ms)
            steps.append(StepTiming("lock", seconds))
            state = CudaState.LOCKED
        if state == CudaState.LOCKED:
            _, seconds = await self._call(pid, "checkpoint", self._driver.checkpoint,
                                          timeout_s=self._settings.transfer_timeout_s, settle_to=before)
            steps.append(StepTiming("checkpoint", seconds))
            state = CudaState.CHECKPOINTED
        return ProcessOutcome(pid, before.name, state.name, tuple(steps))

    async def _restore_one(self, pid: int, before: CudaState, pairs: Sequence[tuple[str, str]]) -> ProcessOutcome:
        steps: list[StepTiming] = []
        if before == CudaState.CHECKPOINTED:
            _, seconds = await self._call(pid, "restore", self._driver.restore, pairs,
                                          timeout_s=self._settings.transfer_timeout_s, settle_to=CudaState.RUNNING)
            steps.append(StepTiming("restore", seconds))
        _, seconds = await self._call(pid, "unlock", self._driver.unlock, timeout_s=self._settings.query_timeout_s,
                                      settle_to=CudaState.RUNNING)
        steps.append(StepTiming("unlock", seconds))
        return ProcessOutcome(pid, before.name, CudaState.RUNNING.name, tuple(steps))

    async def _return_to(self, pid: int, target: CudaState) -> CudaState:
        """Step a process back to `target` (restore, then unlock as needed); returns the state reached."""
        for _ in range(3):
            state, _ = await self._call(pid, "get_state", self._driver.get_state,
                                        timeout_s=self._settings.query_timeout_s)
            if state == target:
                return state
            if state == CudaState.CHECKPOINTED:
                await self._call(pid, "restore", self._driver.restore, (), timeout_s=self._settings.transfer_timeout_s)
            elif state == CudaState.LOCKED and target == CudaState.RUNNING:
                await self._call(pid, "unlock", self._driver.unlock, timeout_s=self._settings.query_timeout_s)
            else:
                return state
        state, _ = await self._call(pid, "get_state", self._driver.get_state, timeout_s=self._settings.query_timeout_s)
        return state

    # ---- driver calls --------------------------------------------------------------------------

    async def _call(self, pid: int, step: str, fn: Callable[..., T], *args: Any, timeout_s: float,
                    settle_to: CudaState | None = None, lock_timeout_ms: int = 0) -> tuple[T, float]:
        """One driver call on one process, bounded and timed; every failure becomes a KybernateError."""
        pending = self._pending.get(pid)
        if pending is not None:
            raise ProcessBusy(f"pid {pid}: an earlier driver {pending.step} has not returned for "
                              f"{time.monotonic() - pending.since:.1f} s; try again once it has", pid=pid, step=step)
        reason = procfs.paused(pid)
        if reason is not None:
            raise ProcessPaused(
                f"pid {pid} is {reason}: the CUDA driver cannot reach a paused process (its calls would block until "
                "it runs again); run GPU steps before pausing the container or after resuming it", pid=pid, step=step)
        request_slots = _REQUEST_SLOTS.get()
        slots = [s for s in (request_slots, self._node_slots) if s is not None]  # always in this order
        held: list[asyncio.Semaphore] = []
        try:
            for slot in slots:
                await slot.acquire()
                held.append(slot)
        except BaseException:
            for slot in held:
                slot.release()
            raise
        started = time.monotonic()
        try:
            result = await run_blocking(fn, pid, *args, what=f"{step} pid {pid}", executor=self._executor,
                                        timeout_s=timeout_s)
        except StillRunning as err:
            # The call keeps its thread: its slots are freed when it returns, not now.
            late, held = held, []
            err.future.add_done_callback(lambda _: _release_all(late))
            self._adopt(pid, step, err.future, settle_to)
            if step in STEPS:
                self._metrics.step_failed(step, "HOOKD_TIMEOUT")
            kind = LockTimeout if step == "lock" else StepFailed
            raise kind(f"pid {pid}: {step} did not return within {timeout_s:.3g} s (is the process stopped?); "
                       "hookd puts it back when the call returns", pid=pid, step=step) from err
        except CudaError as err:
            if step in STEPS:
                self._metrics.step_failed(step, err.name)
            if step == "lock" and err.name == "CUDA_ERROR_TIMEOUT":
                raise LockTimeout(f"pid {pid}: lock timed out after {lock_timeout_ms} ms waiting for submitted GPU "
                                  f"work ({err.name})", pid=pid, step=step, driver_error=err.name) from err
            raise StepFailed(f"pid {pid}: {step} failed: {err.name}" + (f" ({err.detail})" if err.detail else ""),
                             pid=pid, step=step, driver_error=err.name) from err
        finally:
            for slot in held:
                slot.release()
        seconds = time.monotonic() - started
        if step in STEPS:
            self._metrics.step_done(step, seconds)
        return result, seconds

    def _adopt(self, pid: int, step: str, future: asyncio.Future[Any], settle_to: CudaState | None) -> None:
        """Track a driver call that overran its bound; put the process back once it returns."""
        self._pending[pid] = _Pending(step, time.monotonic())
        log.error("driver call overran its bound; the process is pending until it returns",
                  extra={"fields": {"pid": pid, "step": step}})

        def returned(_: asyncio.Future[Any]) -> None:
            task = asyncio.get_running_loop().create_task(self._settle(pid, step, future, settle_to),
                                                          name=f"settle-{pid}")
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

        future.add_done_callback(returned)

    async def _settle(self, pid: int, step: str, future: asyncio.Future[Any], settle_to: CudaState | None) -> None:
        self._pending.pop(pid, None)
        error = future.exception()
        if error is not None:
            log.warning("late driver call failed; process left as the driver has it",
                        extra={"fields": {"pid": pid, "step": step, "error": str(error)}})
            return
        if settle_to is None:
            return
        try:
            reached = await self._return_to(pid, settle_to)
            log.info("late driver call returned; process put back",
                     extra={"fields": {"pid": pid, "step": step, "state": reached.name}})
        except KybernateError as err:
            log.error("could not put back a process after a late driver call",
                      extra={"fields": {"pid": pid, "step": step, "error": err.message}})

    # ---- discovery and planning ------------------------------------------------------------------

    def _pids(self, ref: ContainerRef) -> list[int]:
        if not ref.container_id:
            raise InvalidRequest("container_id is empty")
        for name, value, limit in (("namespace", ref.namespace, MAX_NAME_BYTES),
                                   ("container_id", ref.container_id, MAX_NAME_BYTES),
                                   ("cgroup_path", ref.cgroup_path, MAX_PATH_BYTES)):
            if len(value.encode()) > limit:
                raise InvalidRequest(f"{name} is {len(value.encode())} bytes, more than the limit of {limit}")
        limit = self._settings.max_pids_per_request
        if ref.pids:
            if len(ref.pids) > limit:
                raise TooLarge(f"{ref.name}: {len(ref.pids)} pids in one request, more than the limit of {limit} "
                               "(max_pids_per_request); nothing was changed")
            if any(p <= 0 for p in ref.pids):
                raise InvalidRequest(f"{ref.name}: pids must be positive, got {list(ref.pids)[:10]}")
            return sorted(set(ref.pids))
        if ref.cgroup_path:
            pids = procfs.pids_of_cgroup(ref.cgroup_path)
            if len(pids) > limit:
                raise TooLarge(f"{ref.name}: cgroup {ref.cgroup_path} holds {len(pids)} processes, more than the "
                               f"limit of {limit} (max_pids_per_request); nothing was changed")
            return pids
        raise InvalidRequest(f"{ref.name}: give the container's pids (from the runc shim's Pids) or its cgroup_path")

    async def _discover(self, pids: Sequence[int]) -> tuple[dict[int, CudaState], dict[int, str]]:
        """The driver's state of each CUDA process among pids, and why the others are not CUDA processes."""
        tasks = {pid: asyncio.create_task(self._call(pid, "get_state", self._driver.get_state,
                                                     timeout_s=self._settings.query_timeout_s)) for pid in pids}
        if await _wait_all(tasks.values()):
            raise asyncio.CancelledError
        states: dict[int, CudaState] = {}
        not_cuda: dict[int, str] = {}
        fatal: list[BaseException] = []
        for pid, task in sorted(tasks.items()):
            error = task.exception()  # read every one: an unread task exception is logged as a leak
            if error is None:
                states[pid] = task.result()[0]
            elif isinstance(error, StepFailed) and error.driver_error:
                # Measured: NOT_INITIALIZED (alive, no CUDA) or OPERATING_SYSTEM (gone). Others count as
                # "no CUDA state" too, but say so: NVML's cross-check catches a real CUDA process.
                not_cuda[pid] = error.driver_error
                if error.driver_error not in NOT_A_CUDA_PROCESS:
                    log.warning("unexpected driver answer; treated as not a CUDA process",
                                extra={"fields": {"pid": pid, "error": error.driver_error}})
            else:
                fatal.append(error)
        if fatal:
            raise fatal[0]
        return states, not_cuda

    def _cross_check(self, ref: ContainerRef, states: Mapping[int, CudaState], not_cuda: Mapping[int, str],
                     inventory: Inventory | None) -> None:
        """Refuse when NVML sees GPU memory in a process the driver cannot checkpoint: it would be lost."""
        if inventory is None:
            return
        for pid, uses in sorted(inventory.usage_of(not_cuda).items()):
            held = sum(u.used_bytes for u in uses) / GiB
            raise FailedPrecondition(
                f"{ref.name}: pid {pid} holds {held:.2f} GiB on {', '.join(u.gpu_uuid for u in uses)} (NVML) but the "
                f"CUDA driver cannot checkpoint it ({not_cuda[pid]}); checkpointing would lose its GPU state", pid=pid)

    async def _inventory(self) -> Inventory | None:
        if not self._nvml.available:
            return None
        try:
            return await run_blocking(self._nvml.inventory, what="nvml inventory", executor=self._executor,
                                      timeout_s=self._settings.query_timeout_s)
        except StillRunning:
            log.error("NVML inventory did not return in time; going on without it")
        except Exception as err:  # pynvml.NVMLError and friends: NVML is optional, never fatal
            log.warning("NVML inventory failed; going on without it", extra={"fields": {"error": repr(err)}})
        return None

    async def _plan_restore(self, ref: ContainerRef, pids: Sequence[int], manifest: GpuManifest | None,
                            gpu_map: Mapping[str, str]) -> list[GpuPair]:
        """GPU pairs for the restore, after checking each target GPU has room for what the checkpoint held."""
        if manifest is None or not manifest.gpus:
            if gpu_map:
                return [GpuPair(normalize_uuid(o), normalize_uuid(n)) for o, n in sorted(gpu_map.items())]
            log.warning("no GPU manifest: restoring onto the same GPUs without a VRAM pre-check",
                        extra={"fields": {"container": ref.name}})
            return []
        try:
            olds = [normalize_uuid(g.uuid) for g in manifest.gpus]
        except ValueError as err:
            raise InvalidRequest(f"{ref.name}: GPU manifest: {err}") from err
        inventory = await self._inventory()
        if inventory is None:
            log.warning("no NVML: restoring without a VRAM pre-check", extra={"fields": {"container": ref.name}})
            return [GpuPair(old, gpu_map.get(old, old)) for old in olds]
        pairs = plan_gpu_pairs(manifest.gpus, inventory.gpus, gpu_map)
        target_of = {p.old_uuid: p.new_uuid for p in pairs}
        needed: dict[str, int] = defaultdict(int)
        for g in manifest.gpus:
            needed[target_of[normalize_uuid(g.uuid)]] += g.vram_used_bytes
        # Processes of this container already back on a GPU (an earlier, partial restore) hold their share.
        held: dict[str, int] = defaultdict(int)
        for uses in inventory.usage_of(pids).values():
            for u in uses:
                held[u.gpu_uuid] += u.used_bytes
        short = []
        for uuid, need in sorted(needed.items()):
            gpu = inventory.gpu(uuid)
            want = max(0, need - held[uuid]) + self._settings.restore_vram_headroom_bytes
            if gpu is not None and want > gpu.memory_free_bytes:
                short.append(f"GPU {gpu.index} {uuid} ({gpu.name}) needs {want / GiB:.2f} GiB free, "
                             f"has {gpu.memory_free_bytes / GiB:.2f} GiB")
        if short:
            raise InsufficientVram(
                f"{ref.name}: not enough free VRAM to restore: {'; '.join(short)}. Nothing was changed (the processes "
                "stay checkpointed): free VRAM on that GPU, or restore onto another one with gpu_map")
        return pairs

    def _manifest(self, states: Mapping[int, CudaState], inventory: Inventory | None, remembered: GpuManifest | None,
                  usage: Mapping[int, Sequence[Any]]) -> GpuManifest:
        """GPU usage was read before the lock: a checkpointed process holds no VRAM and NVML no longer lists it.
        A process that was already CHECKPOINTED keeps what this daemon recorded when it checkpointed it."""
        earlier = {p.pid: p for p in remembered.processes} if remembered else {}
        earlier_gpus = {g.uuid: g for g in remembered.gpus} if remembered else {}
        per_gpu: dict[str, int] = defaultdict(int)
        processes = []
        for pid in sorted(states):
            uses = usage.get(pid)
            if uses:
                for u in uses:
                    per_gpu[u.gpu_uuid] += u.used_bytes
                record = GpuProcessRecord(pid, CudaState.CHECKPOINTED.name, tuple(sorted({u.gpu_uuid for u in uses})),
                                          sum(u.used_bytes for u in uses))
            elif pid in earlier:
                record = GpuProcessRecord(pid, CudaState.CHECKPOINTED.name, earlier[pid].gpu_uuids,
                                          earlier[pid].vram_bytes)
                for uuid in record.gpu_uuids:  # an even split: the per-GPU share was not kept per process
                    per_gpu[uuid] += record.vram_bytes // max(1, len(record.gpu_uuids))
            else:
                record = GpuProcessRecord(pid, CudaState.CHECKPOINTED.name)
                if inventory is not None and states[pid] == CudaState.CHECKPOINTED:
                    log.warning("process was checkpointed before this daemon saw it: its GPUs and VRAM are unknown, "
                                "so a restore cannot pre-check VRAM", extra={"fields": {"pid": pid}})
            processes.append(record)
        gpus = []
        for uuid, used in sorted(per_gpu.items()):
            node = inventory.gpu(uuid) if inventory else None
            if node is not None:
                gpus.append(GpuDeviceRecord(uuid, node.name, node.index, used))
            else:
                old = earlier_gpus.get(uuid)
                gpus.append(GpuDeviceRecord(uuid, old.name if old else "", old.index if old else 0, used))
        version = inventory.driver_version if inventory else str(getattr(self._driver, "driver_version", ""))
        return GpuManifest(
            driver_version=version or _cuda_text(self._driver.cuda_version),
            gpus=tuple(sorted(gpus, key=lambda g: g.index)),
            processes=tuple(processes),
            created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        )

    # ---- failure handling -------------------------------------------------------------------------

    async def _undo_checkpoint(self, ref: ContainerRef, states: Mapping[int, CudaState],
                               failures: Mapping[int, BaseException | None], cancelled: bool) -> NoReturn:
        """Put every process this request may have changed back to its state before; then raise."""
        back = {pid: before for pid, before in states.items()
                if before != CudaState.CHECKPOINTED and pid not in self._pending}
        tasks = {pid: asyncio.create_task(self._return_to(pid, before), name=f"rollback-{pid}")
                 for pid, before in back.items()}
        cancelled = await _wait_all(tasks.values()) or cancelled
        stuck = []
        for pid, task in sorted(tasks.items()):
            error = task.exception()
            if error is not None:
                stuck.append(f"pid {pid}: {error}")
            elif task.result() != back[pid]:
                stuck.append(f"pid {pid} is {task.result().name}, was {back[pid].name}")
        stuck += [f"pid {pid}: driver {self._pending[pid].step} still running; put back when it returns"
                  for pid in sorted(states) if pid in self._pending]
        if cancelled and not failures:
            log.warning("checkpoint abandoned by its caller; rolled back",
                        extra={"fields": {"container": ref.name, "left": "; ".join(stuck) or "as it was"}})
            raise asyncio.CancelledError
        primary = _primary(failures)
        what = "; ".join(_describe(pid, e) for pid, e in sorted(failures.items()) if e is not None)
        if [s for s in stuck if "still running" not in s]:
            raise RollbackFailed(
                f"checkpoint of {ref.name} failed ({what}) and putting it back failed too: {'; '.join(stuck)}; "
                "call RestoreGpu to retry, or restart the container", pid=primary.pid, step=primary.step,
                driver_error=primary.driver_error) from primary
        note = f"; {'; '.join(stuck)}" if stuck else ""
        primary.message = (f"checkpoint of {ref.name} failed: {what}; the {len(states)} CUDA process(es) were put back "
                           f"as they were{note}")
        primary.args = (primary.message,)
        raise primary

    def _restore_failure(self, ref: ContainerRef, todo: Mapping[int, CudaState],
                         failures: Mapping[int, BaseException | None]) -> KybernateError:
        primary = _primary(failures)
        what = "; ".join(_describe(pid, e) for pid, e in sorted(failures.items()) if e is not None)
        done = len(todo) - len(failures)
        primary.message = (f"restore of {ref.name} failed: {what}; {done} of {len(todo)} process(es) were restored. "
                           "The failed ones keep their GPU state in host memory: RestoreGpu again retries them")
        primary.args = (primary.message,)
        return primary

    # ---- bookkeeping --------------------------------------------------------------------------------

    def _remember(self, key: tuple[str, str], manifest: GpuManifest) -> None:
        self._manifests[key] = manifest
        self._manifests.move_to_end(key)
        while len(self._manifests) > REMEMBERED_MANIFESTS:
            self._manifests.popitem(last=False)

    @contextlib.asynccontextmanager
    async def _container(self, ref: ContainerRef, op: str) -> AsyncIterator[tuple[str, str]]:
        """Hold the container's lock for one request, and list the request for the stop log."""
        key = (ref.namespace, ref.container_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            request = object()
            self._ops[id(request)] = (f"{op} {ref.name}", time.monotonic())
            # The driver-call slots of this request: tasks it starts inherit them (_call).
            slots = _REQUEST_SLOTS.set(asyncio.Semaphore(self._settings.max_parallel_per_request))
            try:
                yield key
            finally:
                _REQUEST_SLOTS.reset(slots)
                del self._ops[id(request)]


_FAILED_HINT = {
    CudaState.FAILED: ": the driver hit an unrecoverable error in it; restart the container",
    CudaState.CHECKPOINTING: ": another checkpoint of it is running",
    CudaState.RESTORING: ": another restore of it is running",
}


def _refuse_unusable(ref: ContainerRef, states: Mapping[int, CudaState], verb: str) -> None:
    """FailedPrecondition unless every process is in a state a checkpoint or restore can start from."""
    for pid, state in states.items():
        if state not in (CudaState.RUNNING, CudaState.LOCKED, CudaState.CHECKPOINTED):
            raise FailedPrecondition(f"{ref.name}: pid {pid} is {state.name} in the driver and cannot be {verb}"
                                     + _FAILED_HINT.get(state, ""), pid=pid)


def _release_all(slots: Sequence[asyncio.Semaphore]) -> None:
    for slot in slots:
        slot.release()


def _primary(failures: Mapping[int, BaseException | None]) -> KybernateError:
    """The error to report: the first process's, preferring what the caller can act on."""
    errors = [e for _, e in sorted(failures.items()) if e is not None]
    for kind in (ProcessPaused, ProcessBusy, InsufficientVram, LockTimeout, KybernateError):
        for e in errors:
            if isinstance(e, kind):
                return e
    raise errors[0] if errors else RuntimeError("no failure to report")


def _describe(pid: int, error: BaseException) -> str:
    if isinstance(error, KybernateError):
        return error.message
    return f"pid {pid}: {error!r}"


def _valid_gpu_map(gpu_map: Mapping[str, str]) -> dict[str, str]:
    try:
        return {normalize_uuid(old): normalize_uuid(new) for old, new in gpu_map.items()}
    except ValueError as err:
        raise InvalidRequest(f"gpu_map: {err}") from err


def _cuda_text(version: int) -> str:
    return f"cuda-{version // 1000}.{version % 1000 // 10}" if version else ""
