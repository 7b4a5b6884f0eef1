"""Level-triggered reconciliation: bring back GPU state that a crash left LOCKED or CHECKPOINTED.

The shim records each GPU task's desired GPU state in an intent file (kybernate.hooks.api.intent;
docs/lifecycle.md). At start and every `period_s`, hookd reads them all and, for a task whose GPU
state should be on the GPU, restores + unlocks every CUDA process the driver has LOCKED or
CHECKPOINTED (GpuManager.restore: idempotent, with the VRAM pre-check). Rules:

- Never the driver on a frozen or stopped process: such a task is skipped (a paused task is parked).
- A step in flight by a live shim is the shim's to finish; hookd waits for it to settle.
- A task whose shim is dead (orphaned) should run on the GPU whatever it last wanted: nobody will
  finish its park or dump. If its cgroup is frozen, nothing can be done (documented).
- A failure (VRAM short, driver error) is logged, counted in metrics and retried with backoff.
- An intent whose shim and processes are all gone is removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from kybernate.hooks.api import freezer, intent, procfs
from kybernate.hooks.api.errors import InsufficientVram, KybernateError
from kybernate.hooks.api.model import GpuManifest, ManifestError

from .manager import ContainerRef, GpuManager
from .metrics import Metrics
from .reconcile_settings import ReconcileSettings

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0


@dataclass(slots=True)
class _Backoff:
    delay_s: float
    next_at: float


@dataclass
class Reconciler:
    manager: GpuManager
    settings: ReconcileSettings
    metrics: Metrics
    _backoff: dict[Path, _Backoff] = field(default_factory=dict)

    async def run(self) -> None:
        """Forever: one pass, then wait a period. Cancel to stop."""
        while True:
            try:
                await self.pass_once()
            except Exception:  # a bug in one pass must not end reconciliation
                log.exception("reconcile pass crashed")
            if self.settings.period_s <= 0:
                return
            await asyncio.sleep(self.settings.period_s)

    async def pass_once(self) -> dict[str, str]:
        """Look at every intent once; returns what happened per container (for tests and the log)."""
        paths = await asyncio.to_thread(lambda: list(intent.scan(self.settings.intent_dir)))
        outcomes: dict[str, str] = {}
        now = time.monotonic()
        for path in paths:
            backoff = self._backoff.get(path)
            if backoff is not None and now < backoff.next_at:
                continue
            outcome = await self._one(path)
            outcomes[path.stem] = outcome
            if outcome in ("vram-short", "failed"):
                delay = min(MAX_BACKOFF_S, backoff.delay_s * 2 if backoff else max(1.0, self.settings.period_s))
                self._backoff[path] = _Backoff(delay, time.monotonic() + delay)
            else:
                self._backoff.pop(path, None)
        for gone in set(self._backoff) - set(paths):
            del self._backoff[gone]
        log.debug("reconcile pass", extra={"fields": {"intents": len(paths),
                                                       "outcomes": ",".join(f"{k}={v}" for k, v in outcomes.items())}})
        return outcomes

    async def _one(self, path: Path) -> str:
        try:
            record = await asyncio.to_thread(intent.read, path)
        except FileNotFoundError:
            return "gone"
        except (OSError, intent.IntentError) as err:
            log.warning("unreadable intent file; skipped", extra={"fields": {"path": str(path), "error": str(err)}})
            return "unreadable"
        shim_alive = _shim_alive(record)
        pids = _live_pids(record)
        name = f"{record.namespace}/{record.container_id}"
        if not pids:
            if not shim_alive:
                await asyncio.to_thread(_unlink, path)  # shim and task are gone: nothing left to reconcile
                return "removed"
            return "no-process"
        if shim_alive and (record.desired != intent.RUNNING or record.step is not None):
            return "shim-owns"  # parked, dumping, or a step in flight that the live shim will settle
        frozen = [pid for pid in pids if procfs.paused(pid) is not None]
        if frozen:
            if not shim_alive:
                log.warning("orphaned task is frozen; its GPU state cannot be reached until it is thawed",
                            extra={"fields": {"container": name, "pids": frozen}})
            return "frozen"
        # Re-read just before acting: the shim may have started a step meanwhile (then it owns the task).
        try:
            if await asyncio.to_thread(intent.read, path) != record:
                return "changed"
        except (OSError, intent.IntentError):
            return "changed"
        manifest = None
        if record.manifest:
            try:
                manifest = GpuManifest.from_dict(record.manifest)
            except ManifestError as err:
                log.warning("intent holds a malformed manifest; restoring without the VRAM pre-check",
                            extra={"fields": {"container": name, "error": str(err)}})
        ref = ContainerRef(record.namespace, record.container_id, tuple(pids))
        try:
            result = await self.manager.restore(ref, manifest)
        except InsufficientVram as err:
            self.metrics.request("Reconcile", "vram_short")
            log.warning("cannot bring GPU state back yet: VRAM is short; retrying with backoff",
                        extra={"fields": {"container": name, "error": err.message}})
            return "vram-short"
        except KybernateError as err:
            self.metrics.request("Reconcile", "failed")
            log.warning("reconcile failed; retrying with backoff", extra={"fields": {"container": name,
                                                                                      "error": err.message}})
            return "failed"
        moved = [o.pid for o in result.processes if o.state_before != o.state_after]
        if not moved:
            return "in-sync"
        self.metrics.request("Reconcile", "restored")
        log.warning("reconciled: GPU state was stranded and is back on the GPU",
                    extra={"fields": {"container": name, "pids": moved, "desired": record.desired,
                                      "shim": "alive" if shim_alive else "dead"}})
        return "restored"


def _shim_alive(record: intent.Intent) -> bool:
    """The shim that wrote the record still runs: its pid lives with the start time it recorded. Not by its
    command line, which depends on how the shim was launched (a console script, a wrapper, kybernate-shimd's
    process titles): on the H200 a wrapper-launched shim was taken for dead and its parked task restored."""
    if record.shim_pid <= 0 or not procfs.alive(record.shim_pid):
        return False
    return not record.shim_start or procfs.start_time(record.shim_pid) == record.shim_start


def _live_pids(record: intent.Intent) -> list[int]:
    """The task's processes now: its init's cgroup when init lives, else the recorded pids still alive."""
    if record.init_pid and procfs.alive(record.init_pid):
        cgroup = _cgroup_of(record.init_pid)
        if cgroup:
            try:
                return procfs.pids_of_cgroup(cgroup)
            except KybernateError:
                pass
    return sorted(p for p in set(record.pids) | ({record.init_pid} if record.init_pid else set()) if procfs.alive(p))


def _cgroup_of(pid: int) -> str:
    directory = freezer.cgroup_dir(pid, procfs.CGROUP_ROOT)
    return str(directory) if directory is not None else ""


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
