"""hookd's store checkpoints: admission (one per container at a time, a bounded number per node), then
one StoreCheckpoint each, then the bookkeeping of a committed generation: the registry row, retention and
the local budget, and the upload queued to the S3 tier.

The registry and retention are an index and a clean-up: the generation is complete on disk either way
(`kybernate store rebuild` restores the index), so their failures are logged, never the checkpoint's.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from dataclasses import replace
from typing import Protocol

from kybernate.hooks.api.errors import FailedPrecondition
from kybernate.hooks.api.model import StoreCheckpointResult
from kybernate.hooks.api.store import Generation, Store, StoreError
from kybernate.hooks.api.store_registry import Registry, collect

from ..metrics import Metrics
from ..settings import StoreSettings
from .checkpoint import CheckpointDeadline, CheckpointRequest, Emit, StoreCheckpoint, validate

log = logging.getLogger(__name__)


class UploadQueue(Protocol):
    async def enqueue(self, generation: Generation) -> bool:
        """Queue a committed generation for upload; whether an upload was queued (an S3 tier is configured)."""
        ...


class StoreCheckpoints:
    def __init__(self, settings: StoreSettings, executor: Executor, uploads: UploadQueue | None = None,
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        self.store = Store(settings.root)
        self.registry = Registry(settings.registry)
        self.uploads = uploads
        self._slots = asyncio.Semaphore(settings.max_parallel)
        self._active: dict[tuple[str, str], float] = {}  # (namespace, container) -> loop time it began
        self._running: dict[tuple[str, str], StoreCheckpoint] = {}

    def must_finish(self, namespace: str, container_id: str) -> bool:
        """Whether that checkpoint may no longer be cancelled: its dump without leave_running succeeded, so
        the workload exists only in its temp dir until it is committed."""
        running = self._running.get((namespace, container_id))
        return running is not None and running.state.exited

    def busy(self) -> list[str]:
        loop = asyncio.get_running_loop()
        return [f"store checkpoint of {ns}/{cid} for {loop.time() - since:.1f} s"
                for (ns, cid), since in self._active.items()]

    async def checkpoint(self, request: CheckpointRequest, emit: Emit) -> StoreCheckpointResult:
        loop = asyncio.get_running_loop()
        validate(request)  # a refused request is not a failed checkpoint: checked before anything is counted
        who = (request.namespace, request.container_id)
        if who in self._active:
            raise FailedPrecondition(
                f"container {request.container_id!r} is already being checkpointed (for "
                f"{loop.time() - self._active[who]:.1f} s): wait for that checkpoint to finish")
        self._active[who] = loop.time()
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), request.deadline_s)
            except TimeoutError:
                raise CheckpointDeadline(
                    f"no store checkpoint slot became free within the deadline ({request.deadline_s:g} s; "
                    f"{self.settings.max_parallel} run at once on this node); nothing was changed") from None
            try:
                waited = loop.time() - self._active[who]
                shortened = replace(request, deadline_s=request.deadline_s - waited)
                one = StoreCheckpoint(shortened, self.store, self.settings.containerd_address, self.executor, emit)
                self._running[who] = one
                try:
                    outcome = await one.run()
                except Exception:
                    if self.metrics is not None:
                        self.metrics.store_failure("local", "checkpoint")
                    raise
            finally:
                self._running.pop(who, None)
                self._slots.release()
        finally:
            del self._active[who]
        if self.metrics is not None:
            self.metrics.store_transfer("local", "checkpoint", outcome.generation.manifest.size, outcome.total_s)
            self.metrics.store_duration("local", "pause", outcome.pause_s)
        await loop.run_in_executor(self.executor, self._index, outcome.generation)
        queued = await self.uploads.enqueue(outcome.generation) if self.uploads is not None else False
        g = outcome.generation
        return StoreCheckpointResult(key=g.key, generation=g.number, path=g.path, size_bytes=g.manifest.size,
                                     pause_s=outcome.pause_s, total_s=outcome.total_s, phase_s=outcome.phase_s,
                                     upload_queued=queued)

    def _index(self, generation: Generation) -> None:
        """Blocking: the registry row, then retention and the local budget."""
        s = self.settings
        try:
            self.registry.record_local(generation)
            report = collect(self.store, self.registry, keep=s.keep, budget_bytes=s.budget_bytes or None)
        except (StoreError, OSError) as err:
            log.warning("store index not updated (run `kybernate store rebuild`)", extra={"fields": {
                "key": generation.key, "generation": generation.number, "error": str(err)}})
            return
        for removed in report.removed:
            log.info("store generation removed", extra={"fields": {"what": removed}})
        if report.over_budget_by:
            log.warning("store over its local budget, nothing evictable", extra={"fields": {
                "over_bytes": report.over_budget_by}})
