"""The standby controller: discover GPU workloads, sample their idle signals, park the idle, wake on connect.

Every `sample_period_s`:

1. discover the workloads from the intent files (workloads.py) and load what hookd recorded of their parks
   (record.py: after a hookd restart, workloads it had parked are managed again, watchers included);
2. sample each running workload's signals (signals.py) and its VRAM (NVML, by the pids of its cgroup);
3. park every opted-in workload whose signals stayed quiet for its idle period;
4. try again the wakes that failed (a wake that is wanted stays wanted until it works).

While a workload is parked with `wake: connect`, a watcher looks at its pod's listening sockets every
`watch_period_s` (sockwatch.py) and wakes it when a connection is pending. A wake first asks the arbiter of
each of its GPUs (arbiter.py) whether its VRAM fits, parking least recently active workloads if it must.
Wakes are serialised per GPU and at most `max_parallel_wakes` run on the node. Every park and wake is one
structured log line (`standby parked` / `standby woke`) with its trigger, reason and duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kybernate.hooks.api import freezer, intent, procfs
from kybernate.hooks.api.errors import InvalidRequest, KybernateError
from kybernate.hooks.gpu.cuda import normalize_uuid
from kybernate.hooks.gpu.nvml import Inventory, Nvml

from ..gpu_override import GpuOverrides
from ..metrics import Metrics
from . import arbiter, placement, record, settings, signals, sockwatch, workloads
from .executor import Executor, StandbyFailed, StandbyRefused, UnknownWorkload
from .settings import StandbySettings

log = logging.getLogger(__name__)

MAX_RETRY_S = 300.0
# A MakeRoom names at most this many GPUs (as the shim's gpu-map does).
MAX_ROOM_GPUS = 16
ROOM_REASONS = ("start", "restore")
MAX_NEED_BYTES = 1 << 50  # 1 PiB, as the shim's kybernate.io/vram-request
# The shim's phases a Pause parks from (shim/gpu_steps.py): on the GPU, or after a failed step (the task runs;
# a Pause from there checkpoints again). Not while a dump or a restore at Start is in progress.
PARKABLE_PHASES = ("live", "unknown")
# A hibernated workload's `desired` (tier disk): no process, no intent file; hookd's record says where it is.
HIBERNATED = "hibernated"
# What a driver answers a restore with GPU pairs it cannot do (driver 580: INVALID_VALUE for any pairs).
REMAP_REFUSALS = ("CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_SUPPORTED")


@dataclass(slots=True)
class Managed:
    """hookd's view of one workload between samples."""

    workload: workloads.Workload
    tracker: signals.IdleTracker
    record: record.Record | None = None
    gpus: dict[str, int] = field(default_factory=dict)  # GPU UUID -> VRAM bytes held (or to bring back)
    host_ram: int | None = None
    listeners: list[sockwatch.Listener] = field(default_factory=list)
    watcher: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: str = ""  # parking | waking: a step in progress
    last_error: str = ""
    retry_at: float = 0.0
    retry_s: float = 0.0
    wake_wanted: str = ""  # trigger of a wake that failed and is tried again

    @property
    def parked(self) -> bool:
        """Paused by someone (the shim's intent says parked: containerd shows PAUSED), or hibernated."""
        return self.workload.desired in (intent.PARKED, HIBERNATED)

    @property
    def hibernated(self) -> bool:
        return self.workload.desired == HIBERNATED

    @property
    def tier(self) -> str:
        return "disk" if self.hibernated else "ram" if self.parked else ""

    @property
    def ours(self) -> bool:
        """Parked by standby: it wakes it (on connect, on retry)."""
        return self.parked and self.record is not None and self.record.parked


@dataclass(slots=True)
class Hold:
    """Room made for a starting container: counted as used on its GPUs until it holds that VRAM itself (its
    model loads for a while after the start) or `until` passes."""

    gpus: dict[str, int]  # GPU UUID -> bytes
    until: float  # monotonic


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    namespace: str
    container_id: str
    state: str
    tier: str
    opted_in: bool
    policy_error: str
    idle_for_s: float
    idle_period_s: float
    wake: str
    priority: int
    vram_bytes: int
    gpus: tuple[str, ...]
    host_ram_bytes: int
    last_park_s: float
    last_wake_s: float
    parked_by: str
    reason: str
    signals: dict[str, str]
    listeners: tuple[tuple[int, int], ...]
    last_error: str
    woken_by: str
    parks: int


class Controller:
    def __init__(self, settings: StandbySettings, intent_dir: str, nvml: Nvml, metrics: Metrics,
                 executor: Executor | None = None, overrides: GpuOverrides | None = None) -> None:
        self.settings = settings
        self.intent_dir = intent_dir
        self.nvml = nvml
        self.metrics = metrics
        self.executor = executor or Executor(settings.containerd_address, settings.containerd_timeout_s)
        # By GPU UUID; "all" applies to every GPU without one of its own.
        self.budgets = {k if k == "all" else normalize_uuid(k): v for k, v in settings.gpu_budget_bytes.items()}
        self._managed: dict[tuple[str, str], Managed] = {}
        self._holds: dict[tuple[str, str], Hold] = {}  # room made for starting containers
        self._gpu_locks: dict[str, asyncio.Lock] = {}
        self._wake_slots = asyncio.Semaphore(max(1, settings.max_parallel_wakes))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._util_since_us = 0
        # Multiplexing across GPUs: the GPU pairs a wake onto another GPU leaves for hookd's RestoreGpu (the
        # GpuManager's), and the driver's refusal of such a restore once seen (then wakes stay on their own GPU).
        self.overrides = overrides if overrides is not None else GpuOverrides()
        self._remap_refused = ""

    # ---- the loop ----

    async def run(self) -> None:
        """Forever: one tick, then a sample period. Cancel to stop (watchers and wakes in flight stop too)."""
        try:
            while True:
                try:
                    await self.tick()
                except Exception:  # a bug in one tick must not end standby
                    log.exception("standby tick crashed")
                await asyncio.sleep(self.settings.sample_period_s)
        finally:
            await self.stop()

    async def stop(self) -> None:
        pending = [t for t in self._tasks if not t.done()] + [
            m.watcher for m in self._managed.values() if m.watcher is not None and not m.watcher.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def tick(self) -> None:
        now = time.monotonic()
        found = await asyncio.to_thread(workloads.discover, self.intent_dir, self.settings.defaults)
        found += await asyncio.to_thread(_hibernated, self.settings.state_dir, self.settings.defaults,
                                         {w.key for w in found})
        await self._refresh(found, now)
        inventory = await asyncio.to_thread(self.nvml.inventory)
        since, self._util_since_us = self._util_since_us, int(time.time() * 1e6)
        util = await asyncio.to_thread(self.nvml.utilization, since)
        for m in list(self._managed.values()):
            if m.parked or m.busy:
                continue
            pids = await asyncio.to_thread(_pids_of, m.workload.init_pid)
            counters = await asyncio.to_thread(signals.read_counters, m.workload.init_pid, time.monotonic())
            m.host_ram = counters.memory_bytes
            if inventory is not None:
                m.gpus = _vram_by_gpu(inventory, pids)
            gpu_percent = None if util is None else max((util.get(p, 0) for p in pids), default=0)
            m.tracker.observe(counters, gpu_percent, cpu_idle_cores=self.settings.cpu_idle_cores,
                              gpu_idle_percent=self.settings.gpu_idle_percent)
        self._release_holds(time.monotonic())
        self.metrics.standby_parked(sum(1 for m in self._managed.values() if m.ours))
        if self.settings.ram_budget_bytes:
            await self._demote_over_budget()
        now = time.monotonic()
        for m in list(self._managed.values()):
            if m.busy or now < m.retry_at:
                continue
            w = m.workload
            if m.ours and m.wake_wanted:
                self._spawn(self._wake_logged(m, "retry"), f"wake {w.name}")
            elif (not m.parked and w.phase in PARKABLE_PHASES and w.policy.enabled and not w.policy_error
                  and m.tracker.idle_for(now) >= w.policy.idle_s):
                reason = f"idle for {m.tracker.idle_for(now):.0f} s (period {w.policy.idle_s:.0f} s): " + ", ".join(
                    f"{k} {v}" for k, v in sorted(m.tracker.signals.items()))
                self._spawn(self._park_logged(m, "idle", reason), f"park {w.name}")

    async def _refresh(self, found: Iterable[workloads.Workload], now: float) -> None:
        seen: set[tuple[str, str]] = set()
        for w in found:
            seen.add(w.key)
            m = self._managed.get(w.key)
            if m is None:
                m = Managed(workload=w, tracker=signals.IdleTracker(last_active=now))
                m.record = await asyncio.to_thread(record.read, self.settings.state_dir, w.namespace, w.container_id)
                self._managed[w.key] = m
                if m.ours:
                    log.info("standby: managing a workload parked before hookd (re)started",
                             extra={"fields": {"container": w.name, "parked_by": m.record.trigger if m.record else ""}})
            else:
                m.workload = w
            if m.record is not None and m.record.parked and not m.parked and not m.busy:
                # Resumed behind standby's back (ctr task resume, the kubelet): it runs; not ours to wake.
                m.record = replace(m.record, parked=False, woken_by="other")
                await asyncio.to_thread(record.write, self.settings.state_dir, m.record)
                m.tracker.reset(now)
            if m.parked and w.manifest:
                m.gpus = _vram_of_manifest(w.manifest)
            if m.hibernated and m.record is not None and m.record.gpus:
                m.gpus = dict(m.record.gpus)
            # A hibernated workload has no listening socket to watch (they went with its processes).
            if (m.ours and not m.hibernated and w.policy.wake == "connect"
                    and (m.watcher is None or m.watcher.done())):
                m.watcher = asyncio.create_task(self._watch(m), name=f"watch {w.name}")
            if not m.ours and not m.busy and m.watcher is not None and not m.watcher.done():
                m.watcher.cancel()  # woken by someone else: nothing to watch
        for key in set(self._managed) - seen:
            if self._managed[key].busy:
                continue  # mid-hibernate: its intent file is gone before hookd's record says where it went
            gone = self._managed.pop(key)
            if gone.watcher is not None:
                gone.watcher.cancel()
            await asyncio.to_thread(record.remove, self.settings.state_dir, *key)
        for namespace, container_id in await asyncio.to_thread(record.known, self.settings.state_dir):
            if (namespace, container_id) not in self._managed:  # a record of a workload that is gone
                await asyncio.to_thread(record.remove, self.settings.state_dir, namespace, container_id)

    # ---- park ----

    async def park(self, name: str, trigger: str = "api", reason: str = "", tier: str = "") -> WorkloadStatus:
        m = self.find(name)
        if tier not in ("", "ram", "disk"):
            raise InvalidRequest(f"tier {tier!r}: want ram or disk")
        if m.parked and not (tier == "disk" and m.ours and not m.hibernated):
            raise StandbyRefused(f"{m.workload.name} is already parked" + (" (tier disk)" if m.hibernated else ""))
        await self._park(m, trigger, reason or "asked through the API", tier)
        return self.status_of(m)

    async def _park_logged(self, m: Managed, trigger: str, reason: str, tier: str = "") -> None:
        try:
            await self._park(m, trigger, reason, tier)
        except KybernateError:
            pass  # logged and recorded in _park

    async def _park(self, m: Managed, trigger: str, reason: str, tier: str = "") -> None:
        w = m.workload
        tier = tier or w.policy.tier
        async with m.lock:
            if m.hibernated or (m.parked and tier != "disk"):
                return
            demoting = m.parked  # RAM-parked, to disk: the shim dumps the frozen task (its GPU state is in RAM)
            m.busy = "demoting" if demoting else "parking"
            hibernated = None
            try:
                if tier == "disk":
                    hibernated = await self.executor.hibernate(w.namespace, w.container_id)
                    seconds = hibernated.seconds
                else:
                    seconds = await self.executor.pause(w.namespace, w.container_id)
            except (StandbyFailed, StandbyRefused) as err:
                self._failed(m, err.message)
                self.metrics.standby_park(trigger, "failed")
                log.warning("standby park failed; the workload runs on", extra={"fields": {
                    "container": w.name, "trigger": trigger, "error": err.message, "retry_s": round(m.retry_s, 1)}})
                m.busy = ""
                raise
            except BaseException:
                m.busy = ""
                raise
            before = m.record or record.Record(w.namespace, w.container_id, parked=False)
            m.record = replace(before, parked=True, trigger=trigger, reason=reason,
                               parked_at=before.parked_at if demoting else time.time(), park_s=seconds,
                               parks=before.parks + (0 if demoting else 1), tier=tier)
            if hibernated is not None:
                m.record = replace(m.record, key=hibernated.key, generation=hibernated.generation, bundle=w.bundle,
                                   gpus=dict(m.gpus))
                m.workload = replace(w, desired=HIBERNATED, phase=HIBERNATED, init_pid=0)
                if m.watcher is not None and not m.watcher.done() and m.watcher is not asyncio.current_task():
                    m.watcher.cancel()  # its sockets are gone with its processes
            else:
                m.workload = replace(w, desired=intent.PARKED, phase="parked")
            m.last_error, m.retry_s, m.retry_at, m.wake_wanted = "", 0.0, 0.0, ""
            try:
                await asyncio.to_thread(record.write, self.settings.state_dir, m.record)
            finally:
                # Busy until the record is written: a hibernated workload has no intent file, and the tick keeps
                # it only while it is busy or its record says where it went.
                m.busy = ""
            self.metrics.standby_park(trigger, "ok", seconds)
            log.info("standby demoted" if demoting else "standby parked", extra={"fields": {
                "container": w.name, "trigger": trigger, "tier": tier, "park_s": round(seconds, 3),
                "vram_bytes": sum(m.gpus.values()), "reason": reason,
                "generation": f"{hibernated.key}@{hibernated.generation}" if hibernated else None}})
            if hibernated is None and w.policy.wake == "connect" and (m.watcher is None or m.watcher.done()):
                m.watcher = asyncio.create_task(self._watch(m), name=f"watch {w.name}")

    # ---- wake ----

    async def wake(self, name: str, trigger: str = "api") -> WorkloadStatus:
        m = self.find(name)
        if not m.parked:
            raise StandbyRefused(f"{m.workload.name} is not parked")
        await self._wake(m, trigger)
        return self.status_of(m)

    async def _wake_logged(self, m: Managed, trigger: str) -> None:
        try:
            await self._wake(m, trigger)
        except KybernateError:
            pass  # logged, recorded, and tried again by the tick

    async def _wake(self, m: Managed, trigger: str) -> None:
        w = m.workload
        allowed = await self._allowed_gpus(m)  # [] unless it may move to another GPU
        async with self._wake_slots, self._gpus_locked(sorted(set(m.gpus) | set(allowed))), m.lock:
            if not m.parked:
                return
            m.busy = "waking"
            try:
                if allowed:
                    seconds = await self._wake_placed(m, allowed)
                else:
                    for gpu, need in sorted(m.gpus.items()):
                        await self._make_room(m, gpu, need)
                    seconds = await self._resume_or_wake(m, m.hibernated)
            except (StandbyFailed, StandbyRefused) as err:
                m.wake_wanted = trigger if trigger != "retry" else (m.wake_wanted or "retry")
                self._failed(m, err.message)
                self.metrics.standby_wake(trigger, "failed" if isinstance(err, StandbyFailed) else "refused")
                log.warning("standby wake failed; it stays parked and is tried again", extra={"fields": {
                    "container": w.name, "trigger": trigger, "error": err.message, "retry_s": round(m.retry_s, 1)}})
                raise
            finally:
                m.busy = ""
            now = time.monotonic()
            m.workload = replace(w, desired=intent.RUNNING, phase="live")
            woken_by = m.wake_wanted or trigger
            m.last_error, m.retry_s, m.retry_at, m.wake_wanted = "", 0.0, 0.0, ""
            m.tracker.reset(now)
            before = m.record or record.Record(w.namespace, w.container_id, parked=False)
            m.record = replace(before, parked=False, wake_s=seconds, woken_by=woken_by)
            await asyncio.to_thread(record.write, self.settings.state_dir, m.record)
            self.metrics.standby_wake(trigger, "ok", seconds)
            log.info("standby woke", extra={"fields": {
                "container": w.name, "trigger": woken_by, "tier": before.tier or "ram", "wake_s": round(seconds, 3),
                "parked_for_s": round(time.time() - before.parked_at, 1) if before.parked_at else None}})
            if m.watcher is not None and m.watcher is not asyncio.current_task():
                m.watcher.cancel()

    async def _resume_or_wake(self, m: Managed, hibernated: bool) -> float:
        """The wake itself: containerd's Resume (ram), or the shim's Wake from the store (disk)."""
        w, r = m.workload, m.record
        if hibernated and r is not None:
            return await self.executor.wake_from_disk(w.namespace, w.container_id, r.bundle or w.bundle, r.key,
                                                      r.generation)
        return await self.executor.resume(w.namespace, w.container_id)

    # ---- multiplexing across GPUs (kybernate.io/standby-gpus; placement.py) ----

    async def _allowed_gpus(self, m: Managed) -> list[str]:
        """Its own GPU first, then the other GPUs its policy allows that this node has; [] when it stays on its own:
        no other GPU allowed, a workload of several GPUs, no NVML, or a driver that refused a remap before."""
        if not m.workload.policy.gpus or len(m.gpus) != 1 or self._remap_refused:
            return []
        inventory = await asyncio.to_thread(self.nvml.inventory)
        if inventory is None:
            return []
        own = next(iter(m.gpus))
        allowed, unknown = placement.allowed_gpus(own, m.workload.policy.gpus,
                                                  {g.index: normalize_uuid(g.uuid) for g in inventory.gpus})
        if unknown:
            log.warning("standby: kybernate.io/standby-gpus names GPUs this node does not have; ignored",
                        extra={"fields": {"container": m.workload.name, "unknown": ",".join(unknown)}})
        return allowed if len(allowed) > 1 else []

    async def _wake_placed(self, m: Managed, allowed: list[str]) -> float:
        """Wake on the GPU placement.choose picks among `allowed` (parking its plan's victims there first); onto
        another GPU than its own through GPU pairs for hookd's RestoreGpu. If that restore fails, the workload is
        still parked with its GPU state in host RAM (the shim's rule) or still hibernated, and this wake falls back
        to its own GPU as without standby-gpus; a driver that refuses remaps is remembered (until hookd restarts)."""
        own, need = next(iter(m.gpus.items()))
        # Decided once: a failed wake from disk briefly had a task (and an intent file the tick may have read).
        hibernated = m.hibernated
        inventory = await asyncio.to_thread(self.nvml.inventory)
        if inventory is None:  # NVML failed since _allowed_gpus: as without standby-gpus
            await self._make_room(m, own, need)
            return await self._resume_or_wake(m, hibernated)
        rooms = []
        now = time.monotonic()
        for uuid in allowed:
            g = inventory.gpu(uuid)
            if g is not None:  # room held for starting containers is not free
                free = max(0, g.memory_free_bytes - self._held(uuid, m.workload.key, now))
                rooms.append(placement.GpuRoom(uuid, g.memory_total_bytes, free,
                                               self.budgets.get(uuid, self.budgets.get("all")),
                                               tuple(self._candidates(m.workload.key, uuid, now))))
        choice = placement.choose(own, need, m.workload.policy.priority, rooms)
        fields = {"container": m.workload.name, "own": own, "gpu": choice.gpu or None, "need": need,
                  "victims": ",".join(choice.plan.victims), "reason": choice.reason,
                  "skipped": "; ".join(choice.plan.skipped)}
        if not choice.gpu:
            log.warning("standby placement: no room", extra={"fields": fields})
            raise StandbyRefused(f"no room to wake {m.workload.name} on any allowed GPU: {choice.reason}")
        log.info("standby placement", extra={"fields": fields})
        for victim in choice.plan.victims:
            await self._park(self.find(victim), "arbiter", f"to make room for {m.workload.name}: {choice.plan.reason}")
            self.metrics.standby_evicted()
        if choice.gpu == own:
            return await self._resume_or_wake(m, hibernated)
        key = m.workload.key
        self.overrides.set(key, {own: choice.gpu})
        try:
            seconds = await self._resume_or_wake(m, hibernated)
        except StandbyFailed:
            override = self.overrides.clear(key)
            if override is None or not override.used or not override.error:
                raise  # it failed before or apart from the restore onto the other GPU
            self._remap_failed(m, own, choice.gpu, override.error, override.driver_error)
        else:
            m.gpus = {choice.gpu: need}
            return seconds
        finally:
            self.overrides.clear(key)
        # The fallback: its own GPU, as a workload without standby-gpus wakes.
        await self._make_room(m, own, need)
        return await self._resume_or_wake(m, hibernated)

    def _remap_failed(self, m: Managed, own: str, target: str, error: str, driver_error: str) -> None:
        fields = {"container": m.workload.name, "own": own, "gpu": target, "driver_error": driver_error or None,
                  "error": error}
        if driver_error in REMAP_REFUSALS:
            self._remap_refused = driver_error
            log.warning("standby: the driver refuses to restore onto another GPU; this and later wakes stay on their "
                        "own GPU until hookd restarts", extra={"fields": fields})
        else:
            log.warning("standby: the wake onto another GPU failed; waking on its own GPU", extra={"fields": fields})

    def _candidates(self, key: tuple[str, str], gpu: str, now: float) -> list[arbiter.Candidate]:
        """The running workloads on `gpu` other than `key` the arbiter may consider parking."""
        window = self.settings.busy_window_s
        return [
            arbiter.Candidate(name=o.workload.name, vram_bytes=o.gpus.get(gpu, 0), priority=o.workload.policy.priority,
                              last_active=o.tracker.last_active,
                              opted_in=o.workload.policy.enabled and not o.workload.policy_error,
                              busy=o.tracker.busy(now, window), evict_busy=o.workload.policy.evict_busy)
            for k, o in self._managed.items() if k != key and not o.parked and not o.busy and gpu in o.gpus]

    async def _make_room(self, m: Managed, gpu: str, need: int) -> None:
        """Park what the arbiter picks on `gpu` so that `need` bytes fit; StandbyRefused when they cannot."""
        await self._room_on(gpu, need, m.workload.key, m.workload.policy.priority, "wake")

    async def _room_on(self, gpu: str, need: int, key: tuple[str, str], priority: int, why: str) -> arbiter.Plan | None:
        """Park what the arbiter picks on `gpu` so that `need` bytes fit for workload `key` (waking, or starting:
        `why`); StandbyRefused when they cannot. None: nothing to arbitrate (no NVML, or the GPU is gone; the
        shim's VRAM pre-check of a restore decides)."""
        inventory = await asyncio.to_thread(self.nvml.inventory)
        node_gpu = inventory.gpu(gpu) if inventory is not None else None
        if node_gpu is None:
            return None
        name = "/".join(key)
        now = time.monotonic()
        candidates = self._candidates(key, gpu, now)
        budget = self.budgets.get(gpu, self.budgets.get("all"))
        held = self._held(gpu, key, now)
        decision = arbiter.plan(gpu, need, node_gpu.memory_total_bytes, max(0, node_gpu.memory_free_bytes - held),
                                budget, priority, candidates)
        fields = {"container": name, "for": why, "gpu": gpu, "fits": decision.fits,
                  "victims": ",".join(decision.victims), "reason": decision.reason,
                  "skipped": "; ".join(decision.skipped), "held_for_starts": held or None}
        if not decision.fits:
            log.warning("standby arbiter: no room", extra={"fields": fields})
            raise StandbyRefused(f"no room on {gpu} to {why} {name}: {decision.reason}")
        log.info("standby arbiter", extra={"fields": fields})
        for victim in decision.victims:
            o = self.find(victim)
            await self._park(o, "arbiter", f"to make room for {name} ({why}): {decision.reason}")
            self.metrics.standby_evicted()
        return decision

    # ---- room before a start ----

    async def make_room(self, namespace: str, container_id: str, bundle: str, needs: Mapping[str, int],
                        why: str) -> tuple[tuple[str, ...], str]:
        """Before a GPU container starts (or is restored at its Start): park what the arbiter picks so that
        `needs` (bytes by GPU UUID, NVML index or "all") fit, and hold that room for it (start_hold_s). Returns
        the workloads parked and the reasons; StandbyRefused when it cannot fit (nothing parked on that GPU)."""
        if not namespace or not container_id or len(namespace) + len(container_id) > 512:
            raise InvalidRequest("MakeRoom names no container (namespace and container_id, at most 512 bytes)")
        if why not in ROOM_REASONS:
            raise InvalidRequest(f"MakeRoom why={why[:40]!r}: want start or restore")
        if not needs or len(needs) > MAX_ROOM_GPUS:
            raise InvalidRequest(f"MakeRoom names {len(needs)} GPUs: want 1 to {MAX_ROOM_GPUS}")
        if not os.path.isabs(bundle):
            raise InvalidRequest(f"MakeRoom bundle {bundle[:80]!r}: want the task's absolute bundle path")
        inventory = await asyncio.to_thread(self.nvml.inventory)
        if inventory is None:
            return (), "no NVML on this node: nothing to arbitrate"
        resolved = _resolve_needs(inventory, needs)
        key = (namespace, container_id)
        name = f"{namespace}/{container_id}"
        priority = await asyncio.to_thread(_priority_of, bundle, self.settings.defaults, name)
        victims: list[str] = []
        reasons: list[str] = []
        async with self._gpus_locked(sorted(resolved)):
            for gpu, need in sorted(resolved.items()):
                decision = await self._room_on(gpu, need, key, priority, why)
                if decision is not None:
                    victims += decision.victims
                    reasons.append(decision.reason)
            self._holds[key] = Hold(dict(resolved), time.monotonic() + self.settings.start_hold_s)
        return tuple(victims), "; ".join(reasons)

    def _held(self, gpu: str, key: tuple[str, str], now: float) -> int:
        """VRAM of `gpu` held for starting containers other than `key` and not yet in their own use."""
        total = 0
        for k, hold in self._holds.items():
            if k == key or now >= hold.until or gpu not in hold.gpus:
                continue
            m = self._managed.get(k)
            total += max(0, hold.gpus[gpu] - (m.gpus.get(gpu, 0) if m is not None else 0))
        return total

    def _release_holds(self, now: float) -> None:
        """Holds end when their time is up or their container holds on every GPU what was made room for."""
        for k, hold in list(self._holds.items()):
            m = self._managed.get(k)
            if now >= hold.until or (m is not None and all(m.gpus.get(g, 0) >= n for g, n in hold.gpus.items())):
                del self._holds[k]

    # ---- demotion ----

    async def _demote_over_budget(self) -> None:
        """RAM-parked workloads holding more host RAM together than the budget: the least recently parked go to
        disk until the rest fit. Their host RAM is their cgroup's memory (the VRAM copy included)."""
        ram_parked = [m for m in self._managed.values() if m.ours and not m.hibernated and not m.busy]
        for m in ram_parked:
            # No cgroup memory to read: what the driver moved into host RAM (its VRAM) is the estimate.
            m.host_ram = await asyncio.to_thread(signals.memory_bytes, m.workload.init_pid) or sum(m.gpus.values())
        total = sum(m.host_ram or 0 for m in ram_parked)
        budget = self.settings.ram_budget_bytes
        if total <= budget:
            return
        oldest_first = sorted(ram_parked, key=lambda o: o.record.parked_at if o.record else 0.0)
        for m in oldest_first:
            if total <= budget:
                break
            if time.monotonic() < m.retry_at:
                continue
            if any(lst.pending for lst in m.listeners):
                # A connection waits in its accept queue: it is about to be woken, and a dump now would lose
                # that connection with the socket.
                log.info("standby demote skipped: a connection is pending", extra={"fields": {
                    "container": m.workload.name}})
                continue
            reason = (f"RAM-parked workloads hold {total / 2**30:.2f} GiB of host RAM, over the budget of "
                      f"{budget / 2**30:.2f} GiB; least recently parked")
            log.info("standby demote", extra={"fields": {"container": m.workload.name, "host_ram": m.host_ram,
                                                         "reason": reason}})
            total -= m.host_ram or 0
            m.busy = "demoting"  # claimed now: the next tick does not pick it again
            self._spawn(self._demote(m, reason), f"demote {m.workload.name}")

    async def _demote(self, m: Managed, reason: str) -> None:
        try:
            await self._park_logged(m, "demote", reason, "disk")
        finally:
            m.busy = ""

    # ---- wake on connect ----

    async def _watch(self, m: Managed) -> None:
        """While `m` is parked: look at its pod's listening sockets; a pending connection wakes it."""
        w = m.workload
        try:
            diag = await asyncio.to_thread(sockwatch.NetnsDiag, w.init_pid)
            # Its own listeners only: the namespace may hold others' (another container of the pod, or the
            # host's for a pod on the host network). A frozen task opens no new sockets: read once.
            own = await asyncio.to_thread(_socket_inodes, w.init_pid)
        except OSError as err:
            log.warning("standby: cannot watch the workload's sockets; it wakes only through the API",
                        extra={"fields": {"container": w.name, "error": str(err)}})
            return
        try:
            while m.ours:
                try:
                    m.listeners = [x for x in await asyncio.to_thread(diag.listeners) if x.inode in own]
                except OSError as err:
                    log.warning("standby: socket watch failed; it wakes only through the API",
                                extra={"fields": {"container": w.name, "error": str(err)}})
                    return
                if any(lst.pending for lst in m.listeners) and not m.busy:
                    await self._wake_logged(m, "connect")
                    if not m.parked:
                        return
                    await asyncio.sleep(max(self.settings.watch_period_s, m.retry_at - time.monotonic()))
                    continue
                await asyncio.sleep(self.settings.watch_period_s)
        finally:
            await asyncio.to_thread(diag.close)

    # ---- lookups and status ----

    def find(self, name: str) -> Managed:
        """By namespace/id, id, or a unique prefix of the id."""
        if not name or len(name) > 512:
            raise InvalidRequest("name a workload: its container id, a unique prefix of it, or namespace/id")
        namespace, _, cid = name.rpartition("/")
        matches = [m for (ns, c), m in self._managed.items() if (not namespace or ns == namespace) and c == cid]
        if not matches:
            matches = [m for (ns, c), m in self._managed.items()
                       if (not namespace or ns == namespace) and c.startswith(cid)]
        if not matches:
            raise UnknownWorkload(f"no GPU workload named {name!r} (kybernate status lists them)")
        if len(matches) > 1:
            raise InvalidRequest(f"{name!r} names {len(matches)} workloads: give more of the id or namespace/id")
        return matches[0]

    def statuses(self, name: str = "") -> list[WorkloadStatus]:
        if name:
            return [self.status_of(self.find(name))]
        return [self.status_of(m) for _, m in sorted(self._managed.items())]

    def status_of(self, m: Managed) -> WorkloadStatus:
        w, r = m.workload, m.record
        state = m.busy or ("parked" if m.ours else "paused (not by standby)" if m.parked else "running")
        return WorkloadStatus(
            namespace=w.namespace, container_id=w.container_id, state=state, tier=m.tier,
            opted_in=w.policy.enabled, policy_error=w.policy_error,
            idle_for_s=0.0 if m.parked else m.tracker.idle_for(time.monotonic()), idle_period_s=w.policy.idle_s,
            wake=w.policy.wake, priority=w.policy.priority, vram_bytes=sum(m.gpus.values()), gpus=tuple(sorted(m.gpus)),
            host_ram_bytes=m.host_ram or 0, last_park_s=r.park_s if r else 0.0, last_wake_s=r.wake_s if r else 0.0,
            parked_by=r.trigger if r and m.parked else "", reason=r.reason if r and m.parked else "",
            signals=dict(m.tracker.signals), listeners=tuple((lst.port, lst.pending) for lst in m.listeners),
            last_error=m.last_error, woken_by=r.woken_by if r else "", parks=r.parks if r else 0)

    # ---- internals ----

    def _failed(self, m: Managed, error: str) -> None:
        m.last_error = error
        m.retry_s = min(MAX_RETRY_S, m.retry_s * 2 if m.retry_s else self.settings.retry_s)
        m.retry_at = time.monotonic() + m.retry_s

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def _gpus_locked(self, gpus: list[str]) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for gpu in gpus:  # sorted: two wakes spanning GPUs take their locks in one order
                await stack.enter_async_context(self._gpu_locks.setdefault(gpu, asyncio.Lock()))
            yield


def _hibernated(state_dir: str, defaults: Any, known: set[tuple[str, str]]) -> list[workloads.Workload]:
    """Blocking: the workloads hookd hibernated (tier disk): no process and no intent file, only its record and
    the task's bundle (gone once containerd deleted the task: then so is the workload)."""
    out = []
    for namespace, container_id in record.known(state_dir):
        if (namespace, container_id) in known:
            continue
        r = record.read(state_dir, namespace, container_id)
        if r is None or not r.parked or r.tier != "disk" or not r.bundle:
            continue
        try:
            policy, error = settings.policy_of(workloads.bundle_annotations(r.bundle), defaults), ""
        except FileNotFoundError:
            continue  # containerd deleted the task
        except (OSError, ValueError) as err:
            policy, error = defaults, str(err)
        out.append(workloads.Workload(namespace=namespace, container_id=container_id, bundle=r.bundle, init_pid=0,
                                      shim_pid=0, desired=HIBERNATED, phase=HIBERNATED, manifest=None, policy=policy,
                                      policy_error=error))
    return out


def _resolve_needs(inventory: Inventory, needs: Mapping[str, int]) -> dict[str, int]:
    """Bytes by GPU UUID from bytes by UUID, NVML index or "all"; a GPU this node lacks is left out (the start
    cannot get it anyway; the restore's own check says so). InvalidRequest for a malformed entry."""
    out: dict[str, int] = {}
    for gpu, need in needs.items():
        if not 0 < need <= MAX_NEED_BYTES:
            raise InvalidRequest(f"MakeRoom need {need} bytes on {gpu[:60]!r}: want 1 byte to 1 PiB")
        if gpu == "all":
            found = [g.uuid for g in inventory.gpus]
        elif gpu.isascii() and gpu.isdigit() and len(gpu) <= 3:
            found = [g.uuid for g in inventory.gpus if g.index == int(gpu)]
        else:
            try:
                uuid = normalize_uuid("GPU-" + gpu[4:]) if gpu[:4].upper() == "GPU-" and len(gpu) <= 64 else ""
            except ValueError:
                uuid = ""
            if not uuid:
                raise InvalidRequest(f"MakeRoom GPU {gpu[:60]!r}: want a GPU UUID, an NVML index or all")
            node_gpu = inventory.gpu(uuid)
            found = [node_gpu.uuid] if node_gpu is not None else []
        if not found:
            log.info("standby arbiter: a GPU the starting container names is not on this node",
                     extra={"fields": {"gpu": gpu}})
        for uuid in found:
            out[uuid] = out.get(uuid, 0) + need
    return out


def _priority_of(bundle: str, defaults: settings.Policy, name: str) -> int:
    """Blocking: the starting container's standby priority from its bundle's annotations (the defaults' when
    they are unreadable or invalid: the workload's own status says why once it runs)."""
    try:
        return settings.policy_of(workloads.bundle_annotations(bundle), defaults).priority
    except (OSError, ValueError) as err:
        log.info("standby arbiter: the starting container's policy cannot be read; default priority",
                 extra={"fields": {"container": name, "error": str(err)[:200]}})
        return defaults.priority


def _pids_of(init_pid: int) -> list[int]:
    directory = freezer.cgroup_dir(init_pid, procfs.CGROUP_ROOT)
    if directory is not None:
        try:
            return procfs.pids_of_cgroup(str(directory))
        except KybernateError:
            pass
    return [init_pid] if procfs.alive(init_pid) else []


def _socket_inodes(init_pid: int) -> set[int]:
    inodes: set[int] = set()
    for pid in _pids_of(init_pid):
        inodes |= {int(t[8:-1]) for t in procfs.open_files(pid) if t.startswith("socket:[")}
    return inodes


def _vram_by_gpu(inventory: Inventory, pids: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for usages in inventory.usage_of(pids).values():
        for u in usages:
            out[u.gpu_uuid] = out.get(u.gpu_uuid, 0) + u.used_bytes
    return out


def _vram_of_manifest(manifest: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for gpu in manifest.get("gpus") or ():
        if isinstance(gpu, dict) and isinstance(gpu.get("uuid"), str) and isinstance(gpu.get("vram_used_bytes"), int):
            out[normalize_uuid(gpu["uuid"])] = out.get(normalize_uuid(gpu["uuid"]), 0) + gpu["vram_used_bytes"]
    return out
