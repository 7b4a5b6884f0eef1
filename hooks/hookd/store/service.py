"""The Store gRPC servicer (proto/kybernate/api/store.proto), served beside Hookd on hookd's socket.

Checkpoint streams progress while StoreCheckpoints does the work, then the result as the last message.
Errors become statuses through hookd's one mapping (service.to_status). The checkpoint runs as a task of
its own: a client that goes away does not cut it short (a checkpoint half rolled back by a disconnect
would be worse than one that finishes within its deadline); graceful stop waits for it (busy()).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from kybernate.api import store_pb2 as spb
from kybernate.api import store_pb2_grpc
from kybernate.hooks.api.errors import METADATA_STEP
from kybernate.hooks.api.model import StoreCheckpointResult, StoreProgress

from ..metrics import Metrics
from ..service import to_status
from .checkpoint import CheckpointRequest
from .checkpoints import StoreCheckpoints

log = logging.getLogger(__name__)

RPC = "Store.Checkpoint"
# Progress messages buffered for a slow client; byte updates beyond it are dropped (the next one says more).
PROGRESS_BUFFER = 64


class StoreService(store_pb2_grpc.StoreServicer):
    def __init__(self, checkpoints: StoreCheckpoints, metrics: Metrics) -> None:
        self._checkpoints = checkpoints
        self._metrics = metrics
        self._running: dict[asyncio.Task[StoreCheckpointResult], tuple[str, str]] = {}

    async def Checkpoint(self, request: spb.CheckpointRequest, context: Any) -> AsyncIterator[spb.CheckpointProgress]:  # noqa: N802
        default = self._checkpoints.settings.default_deadline_s
        req = CheckpointRequest(request.namespace, request.container_id, request.key, request.leave_running,
                                request.deadline_ms / 1000 if request.deadline_ms else default,
                                request.reason or "cli")
        fields = {"rpc": RPC, "container": f"{req.namespace}/{req.container_id}", "key": req.key,
                  "reason": req.reason}
        queue: asyncio.Queue[StoreProgress] = asyncio.Queue(PROGRESS_BUFFER)

        def emit(progress: StoreProgress) -> None:
            try:
                queue.put_nowait(progress)
            except asyncio.QueueFull:
                pass

        task = asyncio.create_task(self._checkpoints.checkpoint(req, emit), name=f"store-checkpoint {req.container_id}")
        self._running[task] = (req.namespace, req.container_id)
        task.add_done_callback(lambda t: self._running.pop(t, None))
        while not task.done():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield _progress(getter.result())
            else:
                getter.cancel()
        while not queue.empty():
            yield _progress(queue.get_nowait())
        try:
            result = task.result()
        except Exception as err:  # noqa: BLE001  (mapped below; a bug is logged whole)
            mapped = to_status(err)
            if mapped is None:
                self._metrics.request(RPC, grpc.StatusCode.INTERNAL.name)
                log.error("request crashed", exc_info=err, extra={"fields": fields})
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in kybernate-hookd "
                                    f"({type(err).__name__}): see its log (journalctl -u kybernate-hookd)")
                raise AssertionError("context.abort returned") from err
            status, message = mapped
            self._metrics.request(RPC, status.name)
            log.warning("request failed", extra={"fields": {**fields, "status": status.name, "error": message}})
            # The step names the store checkpoint, so that the client tells hookd's own DEADLINE_EXCEEDED (rolled
            # back) from a call that got no answer in time.
            await context.abort(status, message, trailing_metadata=((METADATA_STEP, "store-checkpoint"),))
            raise AssertionError("context.abort returned") from err
        self._metrics.request(RPC, "ok")
        done = spb.CheckpointProgress(phase="done", bytes_done=result.size_bytes, bytes_total=result.size_bytes)
        done.result.CopyFrom(spb.CheckpointResult(
            key=result.key, generation=result.generation, path=result.path, size_bytes=result.size_bytes,
            pause_s=result.pause_s, total_s=result.total_s, phase_s=result.phase_s,
            upload_queued=result.upload_queued))
        yield done

    async def wait_running(self, timeout_s: float) -> None:
        """Graceful stop: wait up to `timeout_s` for the checkpoints in flight, then cancel the rest (each rolls
        back: the task resumed, the temp dir removed), except one whose workload already exited after its dump:
        that one lives only in its temp dir, so it is waited for until it is committed."""
        if not self._running:
            return
        _, late = await asyncio.wait(set(self._running), timeout=timeout_s)
        for task in late:
            who = self._running.get(task)
            if who is not None and self._checkpoints.must_finish(*who):
                log.warning("waiting for a store checkpoint to commit (its workload exited after the dump)",
                            extra={"fields": {"container": "/".join(who)}})
                continue
            log.warning("cancelling a store checkpoint at stop", extra={"fields": {"task": task.get_name()}})
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


def _progress(p: StoreProgress) -> spb.CheckpointProgress:
    return spb.CheckpointProgress(phase=p.phase, bytes_done=p.bytes_done, bytes_total=p.bytes_total)
