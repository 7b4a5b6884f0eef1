"""The store's index: one SQLite file per node (default /var/lib/kybernate/registry.db).

It says what is where without walking the store: key, generation, state, which tiers hold it, size,
created, node, GPU summary. It is an index only: the manifests are the truth, and `rebuild()` makes the
same rows from them (`kybernate store rebuild`). Retention (keep N generations per key) and the local
disk budget (evict local copies, least recently used first, only where another tier holds the
generation; never the only complete copy) run over it.

sqlite3 is blocking: callers on an event loop run these in an executor. Every call opens its own
connection (WAL, busy timeout), so the CLI and hookd may use one file at the same time.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from kybernate.hooks.api.store import LOCK_WAIT_S, Generation, Manifest, Store, StoreError, validate_key

DEFAULT_REGISTRY = "/var/lib/kybernate/registry.db"
REGISTRY_ENV = "KYBERNATE_REGISTRY"
# States a generation passes through; `failed` carries the reason in `error`.
COMPLETE, UPLOADING, UPLOADED, FAILED = "complete", "uploading", "uploaded", "failed"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    local INTEGER NOT NULL,       -- 1: a complete copy is in the local store
    remote INTEGER NOT NULL,      -- 1: a complete copy is in the object store
    size INTEGER NOT NULL,        -- bytes of all files of the generation
    created TEXT NOT NULL,        -- RFC 3339, from the manifest
    node TEXT NOT NULL,
    container TEXT NOT NULL,
    gpu TEXT NOT NULL,            -- JSON summary from the manifest
    last_used REAL NOT NULL,      -- unix seconds: written or restored
    uploaded_bytes INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,  -- upload attempts that failed since the upload was queued
    PRIMARY KEY (key, generation)
)
"""
# Columns added after the first release of the schema: (name, definition), added to an older file on open.
_ADDED_COLUMNS = (("attempts", "INTEGER NOT NULL DEFAULT 0"),)


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    generation: int
    state: str
    local: bool
    remote: bool
    size: int
    created: str
    node: str
    container: str
    gpu: dict[str, Any]
    last_used: float
    uploaded_bytes: int = 0
    error: str = ""
    attempts: int = 0

    @property
    def tiers(self) -> str:
        return ",".join(t for t, present in (("local", self.local), ("s3", self.remote)) if present) or "-"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tiers"] = self.tiers.split(",") if self.tiers != "-" else []
        return data


def default_registry() -> str:
    return os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY


class Registry:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0)
        except (OSError, sqlite3.Error) as err:
            raise StoreError(f"cannot open the store registry {self.path}: {err}") from err
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            have = {r[1] for r in db.execute("PRAGMA table_info(generations)")}
            for name, definition in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE generations ADD COLUMN {name} {definition}")
            with db:
                yield db
        except sqlite3.Error as err:
            raise StoreError(f"store registry {self.path}: {err}") from err
        finally:
            db.close()

    # ---- writes ----

    def record_local(self, generation: Generation, *, remote: bool = False, state: str = COMPLETE) -> None:
        """A complete local generation (just written, or found by rebuild); `remote`: S3 holds it too."""
        self._record(generation.manifest, local=True, remote=remote, state=state)

    def record_remote(self, manifest: Manifest) -> None:
        """A complete generation the S3 tier holds (found by rebuild); a local copy, if any, is recorded apart."""
        self._record(manifest, local=False, remote=True, state=UPLOADED)

    def _record(self, m: Manifest, *, local: bool, remote: bool, state: str) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO generations (key, generation, state, local, remote, size, created, node, container,"
                " gpu, last_used, uploaded_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key, generation) DO UPDATE SET local = max(local, excluded.local),"
                " remote = max(remote, excluded.remote), size = excluded.size,"
                " uploaded_bytes = max(uploaded_bytes, excluded.uploaded_bytes),"
                " state = CASE WHEN excluded.remote = 1 THEN 'uploaded' ELSE state END",
                (m.key, m.generation, state, int(local), int(remote), m.size, m.created, m.node,
                 m.identity.container_id, json.dumps(m.gpu, sort_keys=True), time.time(),
                 m.size if remote else 0))

    def set_state(self, key: str, generation: int, state: str, *, error: str = "", uploaded_bytes: int | None = None,
                  remote: bool | None = None) -> None:
        with self._db() as db:
            db.execute("UPDATE generations SET state = ?, error = ? WHERE key = ? AND generation = ?",
                       (state, error, key, generation))
            if uploaded_bytes is not None:
                db.execute("UPDATE generations SET uploaded_bytes = ? WHERE key = ? AND generation = ?",
                           (uploaded_bytes, key, generation))
            if remote is not None:
                db.execute("UPDATE generations SET remote = ? WHERE key = ? AND generation = ?",
                           (int(remote), key, generation))

    def queue_upload(self, key: str, generation: int) -> None:
        """Durably mark a generation for upload: a restarted hookd resumes every such row (pending_uploads)."""
        with self._db() as db:
            db.execute("UPDATE generations SET state = ?, error = '', uploaded_bytes = 0, attempts = 0"
                       " WHERE key = ? AND generation = ?", (UPLOADING, key, generation))

    def upload_progress(self, key: str, generation: int, uploaded_bytes: int) -> None:
        with self._db() as db:
            db.execute("UPDATE generations SET uploaded_bytes = ? WHERE key = ? AND generation = ?",
                       (uploaded_bytes, key, generation))

    def upload_failed(self, key: str, generation: int, error: str) -> int:
        """One more failed attempt (the upload stays queued and is retried); returns the attempts so far."""
        with self._db() as db:
            db.execute("UPDATE generations SET state = ?, error = ?, attempts = attempts + 1"
                       " WHERE key = ? AND generation = ?", (FAILED, error, key, generation))
            row = db.execute("SELECT attempts FROM generations WHERE key = ? AND generation = ?",
                             (key, generation)).fetchone()
        return int(row[0]) if row else 0

    def upload_done(self, key: str, generation: int, uploaded_bytes: int) -> None:
        with self._db() as db:
            db.execute("UPDATE generations SET state = ?, error = '', uploaded_bytes = ?, remote = 1"
                       " WHERE key = ? AND generation = ?", (UPLOADED, uploaded_bytes, key, generation))

    def pending_uploads(self) -> list[Row]:
        """Local generations queued for upload and not uploaded yet (uploading, or failed and being retried)."""
        return [r for r in self.rows() if r.local and not r.remote and r.state in (UPLOADING, FAILED)]

    def touch(self, key: str, generation: int) -> None:
        with self._db() as db:
            db.execute("UPDATE generations SET last_used = ? WHERE key = ? AND generation = ?",
                       (time.time(), key, generation))

    def forget_local(self, key: str, generation: int) -> None:
        """The local copy is gone: drop the row unless another tier still holds it."""
        with self._db() as db:
            db.execute("UPDATE generations SET local = 0 WHERE key = ? AND generation = ?", (key, generation))
            db.execute("DELETE FROM generations WHERE key = ? AND generation = ? AND local = 0 AND remote = 0",
                       (key, generation))

    def forget_remote(self, key: str, generation: int) -> None:
        """The S3 copy is gone (retention): a local copy stays `complete`; without one the row goes."""
        with self._db() as db:
            db.execute("UPDATE generations SET remote = 0, state = CASE WHEN state = 'uploaded' THEN 'complete'"
                       " ELSE state END WHERE key = ? AND generation = ?", (key, generation))
            db.execute("DELETE FROM generations WHERE key = ? AND generation = ? AND local = 0 AND remote = 0",
                       (key, generation))

    def rebuild(self, store: Store, remote: Iterable[Manifest] | None = None) -> int:
        """Forget everything and index every complete generation from its manifest: the local store's, and
        `remote`, the manifests the S3 tier holds (a node that never saw a key learns its generations; None:
        no S3 tier is configured). Returns how many generations are indexed.

        Row order and content depend only on the manifests, so a wiped index rebuilds to the same listing
        (only last_used, a cache hint, restarts, and attempts, the failed uploads since one was queued).
        With an S3 tier, a local generation that S3 does not hold is queued for upload (`uploading`, as hookd
        queues a new one): hookd uploads it (at its start, or on its next look at the queue). Without one it
        is `complete`."""
        generations = [store.open(key, number) for key in store.keys() for number in store.generations(key)]
        manifests = list(remote or ())
        with self._db() as db:
            db.execute("DELETE FROM generations")
        held = {(m.key, m.generation) for m in manifests}
        for generation in generations:
            there = (generation.key, generation.number) in held
            state = UPLOADED if there else UPLOADING if remote is not None else COMPLETE
            self.record_local(generation, remote=there, state=state)
        for manifest in manifests:
            self.record_remote(manifest)
        return len({(g.key, g.number) for g in generations} | held)

    # ---- reads ----

    def rows(self, key: str | None = None) -> list[Row]:
        query = "SELECT key, generation, state, local, remote, size, created, node, container, gpu, last_used," \
                " uploaded_bytes, error, attempts FROM generations"
        args: tuple[Any, ...] = ()
        if key is not None:
            query += " WHERE key = ?"
            args = (key,)
        with self._db() as db:
            found = db.execute(query + " ORDER BY key, generation", args).fetchall()
        return [Row(r[0], r[1], r[2], bool(r[3]), bool(r[4]), r[5], r[6], r[7], r[8], json.loads(r[9] or "{}"),
                    r[10], r[11], r[12], r[13]) for r in found]


@dataclass(frozen=True, slots=True)
class GcReport:
    removed: tuple[str, ...]  # `key@generation (why)`
    local_bytes: int
    over_budget_by: int  # > 0 when nothing more could be evicted


class RemoteTier(Protocol):
    """What retention needs of the S3 tier (hooks/api/store_s3.py S3Tier; boto3 stays out of this module)."""

    def keys(self) -> list[str]: ...

    def retain(self, key: str, keep: int, busy: Collection[int] = ()) -> list[int]: ...


def collect(store: Store, registry: Registry, *, keep: int, budget_bytes: int | None,
            remote: RemoteTier | None = None) -> GcReport:
    """Retention, then the local budget.

    Retention: of each key, only the newest `keep` (>= 1) complete generations stay, on each tier: locally,
    and in S3 when `remote` is given (retain_remote: every key S3 holds). Budget: while the local copies
    exceed `budget_bytes`, the least recently used local copy that another tier also holds is removed
    locally; a copy that is the only complete one is never removed (the report then says by how much the
    budget is exceeded).
    """
    if keep < 1:
        raise StoreError(f"keep must be at least 1 (got {keep}): the newest generation is never removed")
    removed: list[str] = []
    for key in store.keys():
        numbers = store.generations(key)
        for number in numbers[:-keep]:
            _remove_local(store, registry, key, number)
            removed.append(f"{key}@{number} (retention: keep {keep})")
    if remote is not None:
        for key in remote.keys():
            try:
                validate_key(key)
            except StoreError:
                continue  # not a key of ours (no store writes such a prefix)
            for number in retain_remote(remote, store, registry, key, keep):
                removed.append(f"{key}@{number} (retention: keep {keep}, s3)")
    local = [r for r in registry.rows() if r.local]
    total = sum(r.size for r in local)
    if budget_bytes is not None and total > budget_bytes:
        for row in sorted(local, key=lambda r: r.last_used):
            if total <= budget_bytes:
                break
            if not row.remote:
                continue  # the only complete copy stays
            _remove_local(store, registry, row.key, row.generation, keep_row=True)
            removed.append(f"{row.key}@{row.generation} (budget: local copy evicted, kept in s3)")
            total -= row.size
    over = total - budget_bytes if budget_bytes is not None and total > budget_bytes else 0
    return GcReport(tuple(removed), total, over)


def retain_key(store: Store, registry: Registry, key: str, keep: int) -> list[int]:
    """Retention for one key (a workload's own `kybernate.io/checkpoint-keep`, applied by its shim after each of
    its checkpoints): only the newest `keep` (>= 1) complete local generations stay. Returns those removed."""
    if keep < 1:
        raise StoreError(f"keep must be at least 1 (got {keep}): the newest generation is never removed")
    doomed = store.generations(key)[:-keep]
    for number in doomed:
        _remove_local(store, registry, key, number)
    return doomed


def retain_remote(remote: RemoteTier, store: Store, registry: Registry, key: str, keep: int,
                  busy: Collection[int] = (), lock_wait_s: float = LOCK_WAIT_S) -> list[int]:
    """Retention of one key on the S3 tier (RemoteTier.retain: only the newest `keep` complete generations S3
    holds stay; manifest first). Never touched: a generation this node has queued for upload (its registry row
    `uploading` or `failed`) or names in `busy`, and none while this node downloads the key (a restore or a
    prefetch holds the key's lock: this waits for it). Returns the generations deleted."""
    queued = {r.generation for r in registry.rows(key) if r.local and r.state in (UPLOADING, FAILED)}
    with store.lock(key, lock_wait_s):
        deleted = remote.retain(key, keep, queued | set(busy))
    for number in deleted:
        registry.forget_remote(key, number)
    return deleted


def _remove_local(store: Store, registry: Registry, key: str, number: int, *, keep_row: bool = False) -> None:
    path = os.path.join(store.key_dir(key), str(number))
    # Rename first, so that a crash mid-delete leaves a dot-dir, never a torn numbered generation.
    doomed = os.path.join(store.key_dir(key), f".tmp-delete-{number}-{os.getpid()}")
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        pass
    shutil.rmtree(doomed, ignore_errors=True)
    if keep_row:
        registry.set_state(key, number, UPLOADED, remote=True)
    registry.forget_local(key, number)
