"""The shim's GpuDriver: kybernate-hookd over its unix socket, one client per socket for the daemon's life.

Every hookd call is bounded three ways:

- by containerd's deadline for the task call it serves (ttrpc `timeout_nano`, passed in through
  `call_deadline`), less a margin so that the shim answers DEADLINE_EXCEEDED itself before the ttrpc
  server cancels the handler;
- by `hookd_timeout_s` (runtime.toml), for callers that send no deadline (`ctr`);
- by the client's HTTP/2 keepalive (HookdClient): a daemon that stops answering (stopped, hung,
  gone) fails the call as unavailable within about KEEPALIVE_S, however long the deadline, while a
  daemon that is working (a 24 GiB checkpoint takes ~14 s) keeps answering the pings.

A checkpoint the shim gives up on (deadline, unavailable, its caller cancelled) must not complete
later unseen: hookd rolls back a checkpoint whose caller went away, and the shim also asks for a
restore in the background, which is a no-op for processes that are running and undoes a checkpoint
that finished just as the shim gave up. hookd serialises requests per container, so that restore
runs after the abandoned checkpoint has ended either way. That restore is retried while hookd does
not answer (a stopped daemon may finish the checkpoint when it runs again, before it notices that
its caller has gone), for at most hookd_timeout_s, and is superseded by the container's next GPU
step. A restore the shim cannot wait for (no time left, abandoned) goes on the same way: it is what
brings the GPU back.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from kybernate.hooks.api.client import KEEPALIVE_S, HookdClient, HookdError, HookdUnavailable
from kybernate.hooks.api.model import GpuManifest

from . import gpu_map
from .gpu_map import GpuTargets
from .vram_room import RoomRequest

log = logging.getLogger(__name__)

# The loop time (asyncio's clock) by which the task call being served must be answered; None: no
# deadline from containerd. Set by the task service around a GPU step; tasks inherit it.
call_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("call_deadline", default=None)
# Of the time left before containerd's deadline, this share (at most MARGIN_MAX_S) is kept back for
# the shim to answer after hookd's call ended.
MARGIN_SHARE = 0.1
MARGIN_MAX_S = 1.0
DEADLINE_EXCEEDED = 4  # google.rpc.Code
# The background restore retries while hookd does not answer: first after this many seconds, doubling
# up to RETRY_MAX_S, for at most hookd_timeout_s in all.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0


class HookdDriver:
    def __init__(self, socket_path: str, timeout_s: float) -> None:
        self._client = HookdClient(socket_path)
        self._timeout_s = timeout_s
        # Background restores of abandoned steps, one per (namespace, container id).
        self._rollbacks: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def checkpoint(
        self, namespace: str, container_id: str, pids: list[int], lock_timeout_ms: int
    ) -> GpuManifest:
        self._supersede(namespace, container_id)
        deadline_s = self._deadline_s("checkpoint")
        try:
            manifest = await self._client.checkpoint_gpu(
                namespace, container_id, pids, lock_timeout_ms=lock_timeout_ms, deadline_s=deadline_s
            )
        except (HookdUnavailable, asyncio.CancelledError) as err:
            self._roll_back(namespace, container_id, pids, type(err).__name__)
            raise
        except HookdError as err:
            if err.code == DEADLINE_EXCEEDED:
                self._roll_back(namespace, container_id, pids, err.code_name)
            raise
        return manifest

    async def restore(
        self, namespace: str, container_id: str, pids: list[int], manifest: GpuManifest | None,
        targets: GpuTargets | None = None,
    ) -> None:
        self._supersede(namespace, container_id)
        gpu_map = await self._gpu_map(container_id, manifest, targets)
        # A restore is what puts a process back: one the shim cannot wait for goes on in the background.
        try:
            deadline_s = self._deadline_s("restore")
        except HookdError:
            self._roll_back(namespace, container_id, pids, "no time left", manifest)
            raise
        try:
            await self._client.restore_gpu(namespace, container_id, pids, manifest=manifest, gpu_map=gpu_map,
                                           deadline_s=deadline_s)
        except (HookdUnavailable, asyncio.CancelledError) as err:
            self._roll_back(namespace, container_id, pids, type(err).__name__, manifest)
            raise
        except HookdError as err:
            if err.code == DEADLINE_EXCEEDED:
                self._roll_back(namespace, container_id, pids, err.code_name, manifest)
            raise

    async def make_room(self, namespace: str, container_id: str, bundle: str, request: RoomRequest,
                        manifest: GpuManifest | None, targets: GpuTargets) -> None:
        """hookd's arbiter makes room for `request` (a restore's checkpointed GPUs first mapped to where the
        restore will put them). Bounded like the GPU steps: containerd's deadline or hookd_timeout_s."""
        needs = request.needs
        if manifest is not None:
            chosen = {old.lower(): new for old, new in (await self._gpu_map(container_id, manifest, targets)).items()}
            needs = {}
            for gpu, n in request.needs.items():
                target = chosen.get(gpu.lower(), gpu)
                needs[target] = needs.get(target, 0) + n
        room = await self._client.make_room(namespace, container_id, bundle, needs, request.why,
                                            deadline_s=self._deadline_s("room for the start"))
        if room.victims:
            log.info("hookd parked workloads to make room before the start",
                     extra={"fields": {"id": container_id, "victims": ",".join(room.victims), "reason": room.reason}})

    async def _gpu_map(self, container_id: str, manifest: GpuManifest | None,
                       targets: GpuTargets | None) -> dict[str, str]:
        """The old -> new GPU pairs this container asks for (gpu_map.plan); an index list needs hookd's
        inventory. hookd checks the pairs against the node (a GPU it lacks, another model, too little VRAM:
        refused before any driver call)."""
        if not targets:
            return {}
        node: dict[int, str] | None = None
        if targets.needs_node_gpus and manifest is not None and manifest.gpus:
            health = await self._client.health()
            node = {g.index: g.uuid for g in health.gpus}
        try:
            chosen = gpu_map.plan(manifest, targets, node)
        except gpu_map.GpuMapError as err:
            # Only a list derived from NVIDIA_VISIBLE_DEVICES gets here (the annotation is used as given): the
            # restore goes on where hookd chooses (the same GPUs when here) rather than leave the work stranded.
            log.warning("the container's GPUs cannot take the checkpoint's; hookd chooses",
                        extra={"fields": {"id": container_id, "error": str(err)}})
            return {}
        if chosen:
            log.info("restoring onto other GPUs", extra={"fields": {"id": container_id, "gpu_map": chosen}})
        return chosen

    def _deadline_s(self, what: str) -> float:
        """Seconds the hookd call may take: hookd_timeout_s, or less to answer before containerd's deadline."""
        deadline = call_deadline.get()
        if deadline is None:
            return self._timeout_s
        remaining = deadline - asyncio.get_running_loop().time()
        budget = remaining - min(MARGIN_MAX_S, remaining * MARGIN_SHARE)
        if budget <= 0:
            outcome = "it goes on in the background" if what == "restore" else "nothing was changed"
            raise HookdError(DEADLINE_EXCEEDED, f"no time left for the GPU {what} before containerd's deadline "
                                                f"({remaining:.3g} s left); {outcome}")
        return min(self._timeout_s, budget)

    def _roll_back(self, namespace: str, container_id: str, pids: list[int], reason: str,
                   manifest: GpuManifest | None = None) -> None:
        """Ask hookd, in the background, to put back whatever the abandoned step did or left undone."""
        log.warning("GPU step abandoned; asking hookd to put the processes back in the background",
                    extra={"fields": {"id": container_id, "reason": reason}})
        key = (namespace, container_id)
        task = asyncio.get_running_loop().create_task(
            self._restore_quietly(namespace, container_id, pids, manifest), name=f"gpu-rollback {container_id}")
        self._rollbacks[key] = task
        task.add_done_callback(lambda done: self._rolled_back(key, done))

    def _rolled_back(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        if self._rollbacks.get(key) is task:
            del self._rollbacks[key]

    def _supersede(self, namespace: str, container_id: str) -> None:
        """A new GPU step for the container replaces a pending background restore: hookd's steps are
        idempotent (a checkpoint continues from LOCKED or CHECKPOINTED, a restore from either), and a
        restore already sent is finished by hookd before the new step, which it serialises after it."""
        pending = self._rollbacks.pop((namespace, container_id), None)
        if pending is not None:
            pending.cancel()

    async def _restore_quietly(self, namespace: str, container_id: str, pids: list[int],
                               manifest: GpuManifest | None) -> None:
        """Restore until hookd answers (it may be stopped or restarting), for at most hookd_timeout_s."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._timeout_s
        pause_s = RETRY_FIRST_S
        while True:
            try:
                await self._client.restore_gpu(namespace, container_id, pids, manifest=manifest,
                                               deadline_s=max(1.0, give_up - loop.time()))
                log.info("abandoned GPU step put back", extra={"fields": {"id": container_id}})
                return
            except HookdUnavailable as err:
                if loop.time() + pause_s >= give_up:
                    log.error("could not put back an abandoned GPU step: hookd did not answer; a later resume "
                              "brings the GPU back", extra={"fields": {"id": container_id, "error": str(err)}})
                    return
                log.info("hookd not answering; retrying the restore",
                         extra={"fields": {"id": container_id, "in_s": pause_s, "keepalive_s": KEEPALIVE_S}})
            except HookdError as err:
                log.error("could not put back an abandoned GPU step; a later resume brings the GPU back",
                          extra={"fields": {"id": container_id, "error": str(err)}})
                return
            await asyncio.sleep(pause_s)
            pause_s = min(RETRY_MAX_S, pause_s * 2)
