"""hookd's background uploads of committed generations to the S3 tier.

Durable: a generation is queued by marking its registry row `uploading` before anything is sent, and a
restarted hookd resumes every row that is `uploading` or `failed` with a local copy and no remote one
(resume()); rows queued while hookd runs (by `kybernate store rebuild`) are picked up by a periodic look at
the queue. Once a generation is complete in S3, retention runs there for its key (store_registry.retain_remote).
A failed attempt marks the row `failed` with the attempt count and the reason (what
`kybernate ls` shows) and is retried with a doubling backoff up to a cap, for as long as the local copy
exists. Remotely a generation appears only with its manifest, uploaded last (hooks/api/store_s3.py); files
already uploaded by an interrupted attempt (same size and sha256) are not sent again.

Bounded: max_parallel_uploads generations at once, each with the S3 tier's own file and part parallelism.
boto3 is blocking: every upload runs in this module's own executor; stop() cancels the attempts (the
transfer's progress callback raises, so a worker thread gives up within one part) and waits for them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kybernate.hooks.api.store import Generation, NotFound, Store, StoreError
from kybernate.hooks.api.store_registry import Registry, retain_remote

from ..metrics import Metrics
from ..settings import StoreSettings

log = logging.getLogger(__name__)

# How often an upload's progress (bytes sent) is written to the registry, seconds.
PROGRESS_EVERY_S = 1.0
# How long retention in S3 waits for a download of the same key on this node before it leaves it for later.
RETAIN_LOCK_WAIT_S = 60.0


class UploadCancelled(Exception):
    """hookd is stopping: the transfer gives up (it resumes when hookd starts again)."""


class Uploader:
    def __init__(self, settings: StoreSettings, metrics: Metrics | None = None) -> None:
        from kybernate.hooks.api.store_s3 import S3Config

        self.settings = settings
        self.metrics = metrics
        self.store = Store(settings.root)
        self.registry = Registry(settings.registry)
        prefix = settings.s3_prefix.strip("/")
        self.config = S3Config(settings.s3_bucket, settings.s3_endpoint, prefix + "/" if prefix else "",
                               settings.s3_region or "us-east-1") if settings.s3_bucket else None
        # Threads: the tier's own pools do the transfers; these only run the blocking calls that drive them.
        self._executor = ThreadPoolExecutor(max_workers=settings.max_parallel_uploads + 2,
                                            thread_name_prefix="hookd-upload")
        self._slots = asyncio.Semaphore(settings.max_parallel_uploads)
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._stopping = threading.Event()
        self._tier: Any = None
        self._tier_lock = threading.Lock()
        self._watch: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.config is not None

    def backlog(self) -> int:
        return len(self._tasks)

    async def enqueue(self, generation: Generation) -> bool:
        """Queue a committed generation (durably); False when no S3 tier is configured."""
        if self.config is None:
            return False
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.registry.queue_upload, generation.key, generation.number)
        except StoreError as err:
            # The registry is an index: the upload still runs, only a restart would not resume it.
            log.warning("upload not recorded in the registry", extra={"fields": {"error": str(err)}})
        self._start(generation.key, generation.number)
        return True

    async def resume(self) -> int:
        """At start: every upload a previous hookd left queued or failed; returns how many were resumed. Then
        the queue is looked at again every `upload_rescan_s`: rows queued behind hookd's back (`kybernate store
        rebuild` queues every local generation S3 lacks) are picked up while hookd runs."""
        if self.config is None:
            return 0
        started = await self._pick_up()
        if started:
            log.info("uploads resumed", extra={"fields": {"count": started}})
        if self._watch is None and self.settings.upload_rescan_s > 0:
            self._watch = asyncio.create_task(self._rescan(), name="upload queue rescan")
        return started

    async def _pick_up(self) -> int:
        """Start the upload of every queued row that has none running; how many were started."""
        loop = asyncio.get_running_loop()
        try:
            rows = await loop.run_in_executor(self._executor, self.registry.pending_uploads)
        except StoreError as err:
            log.warning("cannot read the upload queue", extra={"fields": {"error": str(err)}})
            return 0
        new = [r for r in rows if (r.key, r.generation) not in self._tasks]
        for row in new:
            self._start(row.key, row.generation)
        return len(new)

    async def _rescan(self) -> None:
        while True:
            await asyncio.sleep(self.settings.upload_rescan_s)
            started = await self._pick_up()
            if started:
                log.info("queued uploads picked up", extra={"fields": {"count": started}})

    async def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _start(self, key: str, number: int) -> None:
        if (key, number) in self._tasks:
            return
        task = asyncio.create_task(self._upload(key, number), name=f"upload {key}@{number}")
        self._tasks[(key, number)] = task
        task.add_done_callback(lambda _: self._done(key, number))
        self._gauge()

    def _done(self, key: str, number: int) -> None:
        self._tasks.pop((key, number), None)
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.store_upload_backlog(len(self._tasks))

    async def _upload(self, key: str, number: int) -> None:
        from kybernate.hooks.api.store_s3 import S3Error

        loop = asyncio.get_running_loop()
        backoff = self.settings.upload_retry_first_s
        try:
            while True:
                try:
                    async with self._slots:
                        started = loop.time()
                        sent = await loop.run_in_executor(self._executor, self._attempt, key, number)
                    seconds = loop.time() - started
                    # Metrics and the backlog first: whoever sees the registry say `uploaded` sees them too.
                    if self.metrics is not None:
                        self.metrics.store_transfer("s3", "upload", sent, seconds)
                    self._done(key, number)
                    await loop.run_in_executor(self._executor, self.registry.upload_done, key, number, sent)
                    log.info("uploaded", extra={"fields": {"key": key, "generation": number, "bytes": sent,
                                                           "seconds": round(seconds, 3)}})
                    await self._retain(key)
                    return
                except NotFound:
                    log.info("upload dropped: the local copy is gone", extra={"fields": {
                        "key": key, "generation": number}})
                    return
                except (S3Error, StoreError, OSError) as err:
                    if self._stopping.is_set():
                        return
                    attempts = await loop.run_in_executor(self._executor, self._failed, key, number, str(err))
                    if self.metrics is not None:
                        self.metrics.store_failure("s3", "upload")
                    log.warning("upload failed, retrying", extra={"fields": {
                        "key": key, "generation": number, "attempts": attempts, "retry_in_s": backoff,
                        "error": str(err)}})
                    await asyncio.sleep(backoff)
                    backoff = min(self.settings.upload_retry_max_s, backoff * 2)
        except UploadCancelled:
            return

    async def _retain(self, key: str) -> None:
        """Retention on the S3 tier once a new generation of `key` is complete there (docs/store.md): the
        generations this hookd is still uploading are left alone, and a download of the key on this node is
        waited for (at most RETAIN_LOCK_WAIT_S; then the next upload or `kybernate store gc` does it)."""
        from kybernate.hooks.api.store_s3 import S3Error

        busy = {n for k, n in self._tasks if k == key}
        loop = asyncio.get_running_loop()
        try:
            deleted = await loop.run_in_executor(self._executor, self._retain_blocking, key, busy)
        except (S3Error, StoreError, OSError) as err:
            log.warning("retention in s3 not done", extra={"fields": {"key": key, "error": str(err)}})
            return
        for number in deleted:
            log.info("store generation removed", extra={"fields": {
                "what": f"{key}@{number} (retention: keep {self.settings.keep}, s3)"}})

    def _retain_blocking(self, key: str, busy: set[int]) -> list[int]:
        return retain_remote(self._get_tier(), self.store, self.registry, key, self.settings.keep, busy,
                             lock_wait_s=RETAIN_LOCK_WAIT_S)

    def _failed(self, key: str, number: int, error: str) -> int:
        try:
            return self.registry.upload_failed(key, number, f"upload: {error}")
        except StoreError:
            return 0

    # ---- blocking ----

    def _attempt(self, key: str, number: int) -> int:
        """One upload attempt of key@number; the bytes it covers."""
        generation = self.store.open(key, number)
        tier = self._get_tier()
        sent = 0
        last = time.monotonic()

        def progress(n: int) -> None:
            nonlocal sent, last
            if self._stopping.is_set():
                raise UploadCancelled(f"upload of {key}@{number} cancelled: hookd is stopping")
            sent += n
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                try:
                    self.registry.upload_progress(key, number, sent)
                except StoreError:
                    pass

        return int(tier.upload(generation, progress, resume=True))

    def _get_tier(self) -> Any:
        with self._tier_lock:
            if self._tier is None:
                from kybernate.hooks.api.store_s3 import S3Tier

                assert self.config is not None
                self._tier = S3Tier(self.config)
            return self._tier
