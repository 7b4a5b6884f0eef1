"""The store checkpoints a shim takes on its own: checkpoint-on-stop and periodic checkpoints.

Both ask kybernate-hookd's Store.Checkpoint (proto/kybernate/api/store.proto), which pauses the task through
containerd, has this shim dump it straight into the store's temp dir, writes the manifest last and renames
it (a checkpoint cut short leaves nothing visible: hookd rolls back), and queues the upload. hookd's Pause
and Checkpoint come back through this shim's own Pause and Checkpoint handlers, so the GPU steps, the
lifecycle table and the intent file stay exactly as for any checkpoint (docs/lifecycle.md).

- **On stop** (`kybernate.io/checkpoint-on-stop: "true"`): the stop signal for the task's init process
  (SIGTERM, or `kybernate.io/checkpoint-on-stop-signal`) is held while the task is checkpointed into the store
  without leave-running: the dump ends the task, and the Kill is answered OK. If the checkpoint fails or runs
  past its budget (`kybernate.io/checkpoint-on-stop-timeout`, else runtime.toml's checkpoint_on_stop_timeout_s),
  that is logged and the signal is forwarded: the stop goes on. A SIGKILL is forwarded at once and cancels an
  in-flight checkpoint-on-stop (hookd rolls it back).
- **Periodic** (`kybernate.io/checkpoint-every`): a leave-running checkpoint every period, counted from the
  end of the previous one; skipped while the task is paused; never two store checkpoints of one task at once
  (one lock per task, which a checkpoint-on-stop also takes); each one logs the pause it cost the workload.

After each checkpoint the key keeps its newest `kybernate.io/checkpoint-keep` generations (the `retain`
callable: the store registry's retention). Imported only for a task that asked for one of these.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from kybernate.api import task_pb2
from kybernate.hooks.api.client import HookdClient, HookdError, HookdUnavailable
from kybernate.hooks.api.model import StoreCheckpointResult

from .runtime_options import KybernateOptions
from .taskspec import Resilience, TaskSpec
from .ttrpc.errors import TTRPCError

log = logging.getLogger(__name__)

# Of a checkpoint-on-stop's budget, this share (at most MARGIN_MAX_S) is kept back: hookd's deadline ends
# first, so that hookd rolls back and answers before the shim gives up on it.
MARGIN_SHARE = 0.1
MARGIN_MAX_S = 1.0
STOPPED = (task_pb2.STOPPED, task_pb2.UNKNOWN)
DEADLINE_EXCEEDED = 4  # google.rpc.Code
OUT_OF_BUDGET = "checkpoint-on-stop did not finish within its budget; nothing of it is kept and the stop goes on"


class StoreClient(Protocol):
    """What this module needs of kybernate-hookd (HookdClient implements it)."""

    async def store_checkpoint(self, namespace: str, container_id: str, key: str = "", *,
                               leave_running: bool = False, deadline_s: float = 3600.0, reason: str = "cli",
                               on_progress: Callable[..., None] | None = None) -> StoreCheckpointResult: ...


Retain = Callable[[StoreCheckpointResult, int], Awaitable[None]]


@dataclass
class _Task:
    spec: TaskSpec
    want: Resilience
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one store checkpoint of the task at a time
    stopping: bool = False  # a stop signal arrived: no periodic checkpoint starts any more
    stop: asyncio.Task[bool] | None = None  # the checkpoint-on-stop, once asked for
    dumped: asyncio.Event = field(default_factory=asyncio.Event)  # the dump ended the task; hookd commits it
    periodic: asyncio.Task[None] | None = None

    @property
    def container_id(self) -> str:
        return self.spec.container_id


_clients: dict[str, HookdClient] = {}


def hookd_client(options: KybernateOptions) -> StoreClient:
    """One hookd connection per socket for the daemon's life."""
    if options.hookd_socket not in _clients:
        _clients[options.hookd_socket] = HookdClient(options.hookd_socket)
    return _clients[options.hookd_socket]


class StoreCheckpoints:
    """The store checkpoints of every task of this shim that asked for them. Only the event loop touches it."""

    def __init__(self, *, status: Callable[[str], Awaitable[int]], paused: Callable[[str], bool],
                 retain: Retain, client_for: Callable[[KybernateOptions], StoreClient] = hookd_client) -> None:
        self._status = status  # the task's containerd status (task_pb2.Status) from the runc shim
        self._paused = paused  # whether the task is paused now (by a Pause through containerd)
        self._retain = retain
        self._client_for = client_for
        self._tasks: dict[str, _Task] = {}
        self._stops: set[asyncio.Task[bool]] = set()  # checkpoint-on-stop tasks: held until they end

    # ---- the task's life ----

    def created(self, spec: TaskSpec) -> None:
        if spec.resilience is not None and (spec.resilience.on_stop or spec.resilience.every_s):
            self._tasks[spec.container_id] = _Task(spec, spec.resilience)

    def started(self, container_id: str) -> None:
        task = self._tasks.get(container_id)
        if task is None or task.want.every_s is None or task.periodic is not None:
            return
        task.periodic = asyncio.create_task(self._periodic(task), name=f"periodic-checkpoint {container_id}")
        log.info("periodic checkpoints scheduled", extra={"fields": {
            "id": container_id, "key": task.want.key, "every_s": task.want.every_s, "keep": task.want.keep}})

    def forget(self, container_id: str) -> None:
        """The task was deleted: its periodic checkpoints end. A checkpoint-on-stop runs on to its end (bounded
        by its budget): containerd deletes a task that exited through the dump while hookd still commits it."""
        task = self._tasks.pop(container_id, None)
        if task is not None and task.periodic is not None and not task.periodic.done():
            task.periodic.cancel()

    # ---- stop ----

    async def on_stop_signal(self, container_id: str, signal: int, call_deadline: float | None) -> bool:
        """A signal for the task's init process, before it is forwarded. True: the task was checkpointed into
        the store and exited through the dump (or a SIGKILL overtook the checkpoint): do not forward it.
        False: forward it (not a stop signal of a task that wants a checkpoint-on-stop, or the checkpoint
        failed or ran out of its budget; the log says which)."""
        task = self._tasks.get(container_id)
        if task is None or not task.want.on_stop or signal != task.want.stop_signal:
            return False
        task.stopping = True
        if task.stop is None:
            if self._paused(container_id):
                log.warning("checkpoint-on-stop skipped: the task is paused; the stop goes on",
                            extra={"fields": {"id": container_id, "key": task.want.key}})
                return False
            budget = task.want.on_stop_timeout_s
            if call_deadline is not None:  # containerd's deadline for this Kill: answer before it
                left = call_deadline - asyncio.get_running_loop().time()
                budget = min(budget, left - min(MARGIN_MAX_S, left * MARGIN_SHARE))
            if budget <= 0:
                log.warning("checkpoint-on-stop skipped: no time left before containerd's deadline for the "
                            "stop; the stop goes on", extra={"fields": {"id": container_id}})
                return False
            task.stop = asyncio.create_task(self._stop_checkpoint(task, budget),
                                            name=f"checkpoint-on-stop {container_id}")
            self._stops.add(task.stop)
            task.stop.add_done_callback(self._stops.discard)
        # A second stop signal waits for the same checkpoint. wait() (not shield) so that a checkpoint that a
        # SIGKILL cancelled is not mistaken for this handler being cancelled.
        dumped = asyncio.create_task(task.dumped.wait(), name=f"dumped {container_id}")
        try:
            await asyncio.wait({task.stop, dumped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dumped.cancel()
        if task.stop.cancelled():
            return True  # a SIGKILL overtook it: the task is being killed, the stop signal is moot
        if not task.stop.done():
            # The dump ended the task: the stop is done. hookd commits the generation on its own (or rolls it
            # back: nothing half-written is ever visible); the Kill is answered now, because containerd
            # deletes an exited task and may close this shim's connection, the pending Kill's with it.
            log.info("checkpoint-on-stop: the task exited through the dump; hookd commits the checkpoint",
                     extra={"fields": {"id": container_id, "key": task.want.key}})
            return True
        return task.stop.result()

    def dumped(self, container_id: str) -> None:
        """This shim's Checkpoint ended the task through the dump (hookd commits the generation next)."""
        task = self._tasks.get(container_id)
        if task is not None:
            task.dumped.set()

    def killed(self, container_id: str) -> None:
        """A SIGKILL was forwarded to the task: cancel its checkpoint-on-stop in flight. Once the dump has ended
        the task there is nothing left to cancel (containerd kills what is left of an exited task's processes
        with a SIGKILL of its own): the checkpoint is being committed and is waited for."""
        task = self._tasks.get(container_id)
        if task is None:
            return
        task.stopping = True
        if task.stop is not None and not task.stop.done() and not task.dumped.is_set():
            log.warning("SIGKILL cancels the checkpoint-on-stop in flight; nothing of it is kept",
                        extra={"fields": {"id": container_id, "key": task.want.key}})
            task.stop.cancel()

    async def _stop_checkpoint(self, task: _Task, budget: float) -> bool:
        loop = asyncio.get_running_loop()
        began = loop.time()
        give_up = began + budget
        cid, key = task.container_id, task.want.key
        log.info("checkpoint-on-stop: checkpointing into the store before the stop",
                 extra={"fields": {"id": cid, "key": key, "budget_s": round(budget, 3)}})
        try:
            async with asyncio.timeout(budget):
                async with task.lock:  # waits for a periodic checkpoint in flight, within the budget
                    left = give_up - loop.time()
                    result = await self._client_for(task.spec.options).store_checkpoint(
                        task.spec.namespace, cid, key, leave_running=False,
                        deadline_s=max(0.001, left - min(MARGIN_MAX_S, left * MARGIN_SHARE)), reason="stop")
        except TimeoutError:
            log.warning(OUT_OF_BUDGET, extra={"fields": {"id": cid, "key": key, "budget_s": round(budget, 3)}})
            return False
        except HookdError as err:
            if err.code == DEADLINE_EXCEEDED:  # hookd's deadline (the budget less a margin): it rolled back
                log.warning(OUT_OF_BUDGET, extra={"fields": {"id": cid, "key": key, "budget_s": round(budget, 3),
                                                             "error": str(err)}})
            else:
                log.warning("checkpoint-on-stop failed; nothing of it is kept and the stop goes on",
                            extra={"fields": {"id": cid, "key": key, "error": str(err),
                                              "after_s": round(loop.time() - began, 3)}})
            return False
        except HookdUnavailable as err:
            log.warning("checkpoint-on-stop failed; nothing of it is kept and the stop goes on",
                        extra={"fields": {"id": cid, "key": key, "error": str(err),
                                          "after_s": round(loop.time() - began, 3)}})
            return False
        log.info("checkpoint-on-stop stored; the task exited through the dump", extra={"fields": {
            "id": cid, "key": result.key, "generation": result.generation, "size": result.size_bytes,
            "pause_s": round(result.pause_s, 3), "total_s": round(result.total_s, 3),
            "upload_queued": result.upload_queued}})
        await self._retain_quietly(task, result)
        return True

    # ---- periodic ----

    async def _periodic(self, task: _Task) -> None:
        cid, every = task.container_id, task.want.every_s
        assert every is not None
        try:
            while not task.stopping:
                await asyncio.sleep(every)
                if task.stopping:
                    return
                if await self._status_or_stopped(cid) in STOPPED:
                    log.info("periodic checkpoints end: the task has exited", extra={"fields": {"id": cid}})
                    return
                if self._paused(cid):
                    log.info("periodic checkpoint skipped: the task is paused", extra={"fields": {"id": cid}})
                    continue
                await self._periodic_once(task)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: say so, the task runs on without periodic checkpoints
            log.exception("periodic checkpoints stopped by an unexpected error", extra={"fields": {"id": cid}})

    async def _status_or_stopped(self, container_id: str) -> int:
        """The task's status; STOPPED when the runc shim no longer knows it (deleted behind our back)."""
        try:
            return await self._status(container_id)
        except TTRPCError as err:
            log.info("periodic checkpoints: the task's state cannot be read", extra={"fields": {
                "id": container_id, "error": err.message}})
            return task_pb2.STOPPED

    async def _periodic_once(self, task: _Task) -> None:
        cid, key = task.container_id, task.want.key
        if task.lock.locked():
            log.info("periodic checkpoint skipped: another checkpoint of the task is in flight",
                     extra={"fields": {"id": cid}})
            return
        async with task.lock:
            if task.stopping:
                return
            try:
                result = await self._client_for(task.spec.options).store_checkpoint(
                    task.spec.namespace, cid, key, leave_running=True, deadline_s=task.spec.options.hookd_timeout_s,
                    reason="periodic")
            except (HookdError, HookdUnavailable) as err:
                log.warning("periodic checkpoint failed; the task runs on, the next period retries",
                            extra={"fields": {"id": cid, "key": key, "error": str(err)}})
                return
        log.info("periodic checkpoint stored", extra={"fields": {
            "id": cid, "key": result.key, "generation": result.generation, "size": result.size_bytes,
            "pause_s": round(result.pause_s, 3), "total_s": round(result.total_s, 3),
            "upload_queued": result.upload_queued}})
        await self._retain_quietly(task, result)

    async def _retain_quietly(self, task: _Task, result: StoreCheckpointResult) -> None:
        try:
            await self._retain(result, task.want.keep)
        except Exception as err:  # the new generation is complete either way; the next checkpoint retries
            log.warning("retention after a checkpoint failed", extra={"fields": {
                "id": task.container_id, "key": result.key, "keep": task.want.keep, "error": str(err)}})


def retain(generation_path: str, key: str, keep: int) -> list[int]:
    """Blocking: of `key`, only the newest `keep` complete generations stay in the local store that holds
    `generation_path` (the one just written), through the store registry's retention ($KYBERNATE_REGISTRY in
    containerd's environment, default /var/lib/kybernate/registry.db: hookd's default). Returns those removed."""
    from kybernate.hooks.api.store import Store
    from kybernate.hooks.api.store_registry import Registry, default_registry, retain_key

    store = Store(os.path.dirname(os.path.dirname(generation_path)))
    removed = retain_key(store, Registry(default_registry()), key, max(1, keep))
    if removed:
        log.info("retention", extra={"fields": {"key": key, "keep": keep, "removed": removed}})
    return removed
