"""Wake a hibernated container from its store generation (standby's disk tier).

A hibernate is a store checkpoint with `hibernate=True` (checkpoint.py): a normal, complete generation with
manifest.json written last. Waking it: the generation's files are checked against the manifest (size and
sha256, as every restore from the store is), hard-linked into `<store>/.restore/<container>-<random>/` (CRIU
writes its restore stats next to the images, and a generation never changes once complete), and our shim's
Wake restores the task from there into the same container. The link dir goes once the wake returned,
whatever it answered: a failed wake leaves the generation untouched and the task hibernated, so it can be
retried.

Blocking calls (hashing, linking) run in the store's executor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import shutil
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from kybernate.hooks.api import store as store_layout
from kybernate.hooks.api.errors import Code, KybernateError
from kybernate.hooks.containerd.shim import ShimCallFailed, ShimUnreachable, shim_addresses, shim_wake

log = logging.getLogger(__name__)

LINK_DIRS = ".restore"  # the same place the shim's store restores link into (shim/restore_store.py)


class WakeFailed(KybernateError):
    """The wake from the store failed; the task stays hibernated and its generation untouched."""

    code = Code.ABORTED


class WakeRefused(KybernateError):
    """The generation cannot be woken from (missing, damaged); nothing was changed."""

    code = Code.FAILED_PRECONDITION


@dataclass(frozen=True, slots=True)
class Woken:
    pid: int
    verify_s: float  # the generation's sha256 check and the links
    wake_s: float  # the shim's Wake: runc's restore (CRIU) and the GPU restore
    runc_restore_s: float  # runc's restore alone (CRIU and runc), as the shim timed it
    criu_restore_s: float  # CRIU's own account of its restore (0: unknown)
    total_s: float


async def wake_from_store(store: store_layout.Store, executor: Executor, containerd_address: str, namespace: str,
                          container_id: str, spec: dict[str, Any], key: str, generation: int,
                          timeout_s: float) -> Woken:
    loop = asyncio.get_running_loop()
    began = time.monotonic()
    workdir = await loop.run_in_executor(executor, functools.partial(
        _verified_links, store, key, generation, container_id))
    verified = time.monotonic()
    try:
        addresses = shim_addresses(containerd_address, namespace, spec, container_id)
        reply = await shim_wake(addresses, namespace, container_id, os.path.join(workdir, "checkpoint"),
                                timeout=timeout_s)
    except ShimCallFailed as err:
        raise WakeFailed(f"the wake of {namespace}/{container_id} from {key}@{generation} failed; it stays "
                         f"hibernated: {err.code.name}: {err.message}") from None
    except ShimUnreachable as err:
        raise WakeFailed(str(err)) from None
    finally:
        await loop.run_in_executor(executor, functools.partial(shutil.rmtree, workdir, True))
    done = time.monotonic()
    woken = Woken(pid=reply.pid, verify_s=verified - began, wake_s=done - verified, runc_restore_s=reply.runc_restore_s,
                  criu_restore_s=reply.criu_restore_s, total_s=done - began)
    log.info("woken from the store", extra={"fields": {
        "container": container_id, "generation": f"{key}@{generation}", "pid": woken.pid,
        "verify_s": round(woken.verify_s, 3), "wake_s": round(woken.wake_s, 3),
        "runc_restore_s": round(woken.runc_restore_s, 3), "criu_restore_s": round(woken.criu_restore_s, 3),
        "total_s": round(woken.total_s, 3)}})
    return woken


def _verified_links(store: store_layout.Store, key: str, number: int, container_id: str) -> str:
    """Blocking: the generation checked against its manifest, its checkpoint/ linked into a fresh dir."""
    try:
        generation = store.open(key, number)
        store.verify(generation)
    except store_layout.Corrupt as err:
        raise WakeRefused(f"{key}@{number}: refused, the hibernate image is damaged: {err}") from None
    except store_layout.StoreError as err:
        raise WakeRefused(f"{key}@{number}: {err}") from None
    workdir = os.path.join(store.root, LINK_DIRS, f"{container_id[:64]}-{secrets.token_hex(4)}")
    try:
        for entry in generation.manifest.files:
            if not entry.path.startswith("checkpoint/"):
                continue
            target = os.path.join(workdir, entry.path)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            store_layout.link_or_copy(os.path.join(generation.path, entry.path), target)
    except OSError as err:
        shutil.rmtree(workdir, ignore_errors=True)
        raise WakeFailed(f"{key}@{number}: cannot prepare the wake in {workdir}: {err}") from None
    return workdir
