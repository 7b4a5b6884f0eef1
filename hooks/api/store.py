"""The checkpoint store on disk: `<root>/<key>/<generation>/`, complete only once `manifest.json` is in it.

A generation is written into a hidden temp dir next to its final place (`<root>/<key>/.tmp-<random>`),
every file hashed, `manifest.json` written last and fsynced, and the dir renamed into place: a crash or a
full disk never leaves anything that looks complete (temp dirs start with a dot and have no number).
Generations are immutable once renamed. Readers verify size and sha256 of every listed file before
anything is handed on (docs/store.md).

Pure file operations, no containerd or RPC: the checkpoint path (hooks/hookd/store/checkpoint.py) and the shim's
restore (shim/restore_store.py) both build on it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

MANIFEST = "manifest.json"
FORMAT = 1
CREATOR = "kybernate"
CREATOR_VERSION = "0.1.0"
MAX_KEY_LENGTH = 128
TEMP_PREFIX = ".tmp-"
_READ_SIZE = 4 << 20
# Files are hashed in parts of this size, all parts of all files in parallel: one sha256 stream runs at
# about 1-2 GB/s on one core, too slow next to a CRIU dump of many GiB (docs/store.md, "Hashes").
PART_SIZE = 64 << 20
_HASH_THREADS = max(2, min(16, os.cpu_count() or 2))
# Keys' lock files, `<root>/.locks/<key>`: one download of a key into the local store per node at a time
# (docs/resilience.md). A dot-dir: never taken for a key.
LOCK_DIR = ".locks"
LOCK_WAIT_S = 1800.0
_LOCK_POLL_S = 0.05
# Below this many free bytes at the moment of a failure, the store counts as full.
FULL_THRESHOLD = 16 << 20


class StoreError(Exception):
    """A store operation failed; the message says which key/generation/file and what to do."""


class BadKey(StoreError):
    """A key that cannot name a directory safely; nothing was touched."""


class NotFound(StoreError):
    """No complete generation for the key (or not the one asked for)."""


class Corrupt(StoreError):
    """A generation's files do not match its manifest; `path` names the first bad file."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class StoreFull(StoreError):
    """The store's filesystem ran out of space while writing; the partial generation was removed."""


def validate_key(key: str) -> str:
    """`key` if it can name one directory level; BadKey saying what is wrong otherwise."""
    if not key:
        raise BadKey("checkpoint key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise BadKey(f"checkpoint key is {len(key)} characters long; at most {MAX_KEY_LENGTH} are allowed")
    if any(unicodedata.category(ch).startswith("C") for ch in key):
        raise BadKey(f"checkpoint key {key!r} contains control or unprintable characters")
    if "/" in key or "\\" in key:
        raise BadKey(f"checkpoint key {key!r} contains a path separator")
    if key in (".", "..") or ".." in key:
        raise BadKey(f"checkpoint key {key!r} contains '..'")
    if key.startswith("."):
        raise BadKey(f"checkpoint key {key!r} starts with '.' (reserved for the store's temp dirs)")
    if not all(ch.isascii() and (ch.isalnum() or ch in "._-:@+=") for ch in key):
        raise BadKey(f"checkpoint key {key!r}: use letters, digits and . _ - : @ + = only")
    if "@" in key:
        raise BadKey(f"checkpoint key {key!r} contains '@' (it separates key and generation in store:KEY@GEN)")
    return key


def parse_reference(reference: str) -> tuple[str, int | None]:
    """`KEY` or `KEY@GENERATION` (the part after `store:`) → (key, generation or None for the newest)."""
    key, sep, gen = reference.partition("@")
    validate_key(key)
    if not sep:
        return key, None
    if not gen.isdigit() or not gen.isascii() or int(gen) < 1 or len(gen) > 18:
        raise BadKey(f"generation {gen!r} in {reference!r} is not a positive number")
    return key, int(gen)


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file: `sha256` is the file's own sha256 when it fits in one part (size <= part_size); a larger
    file lists the sha256 of each `part_size` part in `parts`, and `sha256` is the sha256 of those part
    digests concatenated (as raw bytes), so that parts hash (and verify) in parallel."""

    path: str  # relative to the generation dir, '/'-separated
    size: int
    sha256: str
    part_size: int = PART_SIZE
    parts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who was checkpointed: the container and, when CRI made it, its pod."""

    container_id: str
    container_name: str = ""
    namespace: str = ""
    image: str = ""
    runtime: str = ""
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""


@dataclass(frozen=True, slots=True)
class Manifest:
    key: str
    generation: int
    created: str  # RFC 3339, UTC
    node: str
    identity: Identity
    files: tuple[FileEntry, ...]
    gpu: dict[str, Any] = field(default_factory=dict)  # summary of kybernate.json: gpus, processes, vram
    creator: str = CREATOR
    creator_version: str = CREATOR_VERSION
    format: int = FORMAT

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        data = asdict(self)
        data["files"] = [{k: v for k, v in asdict(f).items() if k != "parts" or v} for f in self.files]
        data["size"] = self.size
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this kybernate reads {FORMAT}")
            files = tuple(FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"]),
                                    int(f.get("part_size", PART_SIZE)), tuple(str(p) for p in f.get("parts", ())))
                          for f in data["files"])
            for entry in files:
                _check_relative(entry.path)
            return cls(
                key=validate_key(str(data["key"])),
                generation=int(data["generation"]),
                created=str(data["created"]),
                node=str(data["node"]),
                identity=Identity(**{k: str(v) for k, v in data["identity"].items()}),
                files=files,
                gpu=dict(data.get("gpu") or {}),
                creator=str(data.get("creator", "")),
                creator_version=str(data.get("creator_version", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise Corrupt(f"{where} is not a valid kybernate manifest: {err}", where) from err


@dataclass(frozen=True, slots=True)
class Generation:
    root: str
    key: str
    number: int
    manifest: Manifest

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.key, str(self.number))


def _check_relative(path: str) -> None:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path or "\0" in path:
        raise ValueError(f"file path {path!r} is not a plain relative path")


def sha256_range(path: str, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    buf = bytearray(min(_READ_SIZE, max(length, 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = length
        while left > 0:
            n = f.readinto(view[:min(left, len(buf))])
            if not n:
                break
            digest.update(view[:n])
            left -= n
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    return sha256_range(path, 0, 1 << 62)


def _combine(parts: list[str]) -> str:
    return hashlib.sha256(b"".join(bytes.fromhex(p) for p in parts)).hexdigest()


def _part_offsets(size: int, part_size: int) -> list[int]:
    return list(range(0, size, part_size)) or [0]


def _walk_files(top: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                raise StoreError(f"{full}: only regular files can go into the store")
            found.append(os.path.relpath(full, top).replace(os.sep, "/"))
    return found


def hash_files(top: str, names: Iterable[str], part_size: int = PART_SIZE,
                known: dict[str, dict[int, str]] | None = None) -> list[FileEntry]:
    """Size and sha256 of each file, every part of every file in parallel (hashlib releases the GIL).

    `known` holds digests of parts already hashed while the file was being written (PartHasher), by
    file and offset; only full parts inside the final size are taken from it."""
    known = known or {}
    sized = [(name, os.path.getsize(os.path.join(top, name))) for name in names]
    jobs = [(name, offset) for name, size in sized for offset in _part_offsets(size, part_size)
            if not (offset + part_size <= size and offset in known.get(name, {}))]
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        digests = list(pool.map(lambda job: sha256_range(os.path.join(top, job[0]), job[1], part_size), jobs))
    by_part = {(name, offset): digest for (name, offset), digest in zip(jobs, digests, strict=True)}
    entries = []
    for name, size in sized:
        parts = [by_part.get((name, offset)) or known[name][offset] for offset in _part_offsets(size, part_size)]
        if size <= part_size:
            entries.append(FileEntry(name, size, parts[0], part_size))
        else:
            entries.append(FileEntry(name, size, _combine(parts), part_size, tuple(parts)))
    return entries


class PartHasher:
    """Hashes the full parts of CRIU's page images while CRIU is still writing them, so that most of the
    hashing is done when the dump ends (on a machine with spare cores it costs no wall time).

    CRIU appends to `pages-*.img` and never rewrites what it wrote; should that ever change, the
    manifest would not match and every reader refuses the generation: a failed restore, never a wrong one.
    """

    PATTERN = "pages-"
    POLL_S = 0.05

    def __init__(self, top: str, part_size: int = PART_SIZE) -> None:
        self.top = top
        self.part_size = part_size
        self.known: dict[str, dict[int, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kybernate-part-hasher", daemon=True)
        # CRIU writes pages at ~2 GB/s on a GPU node, faster than one core hashes them: several parts at
        # once, leaving one core to CRIU.
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)),
                                        thread_name_prefix="kybernate-part-hash")

    def __enter__(self) -> PartHasher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._hash_ready():
                self._stop.wait(self.POLL_S)

    def _hash_ready(self) -> bool:
        """Hash every part that is fully written now, in parallel; whether any was."""
        jobs: list[tuple[str, str, int]] = []
        for dirpath, _, filenames in os.walk(self.top):
            for name in filenames:
                if not name.startswith(self.PATTERN) or self._stop.is_set():
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.top).replace(os.sep, "/")
                done = self.known.setdefault(rel, {})
                try:
                    size = os.path.getsize(full)
                except OSError:
                    continue
                offset = len(done) * self.part_size
                while offset + self.part_size <= size:
                    jobs.append((full, rel, offset))
                    offset += self.part_size
        if not jobs:
            return False
        futures = [(rel, offset, self._pool.submit(sha256_range, full, offset, self.part_size))
                   for full, rel, offset in jobs]
        for rel, offset, future in futures:
            try:
                self.known[rel][offset] = future.result()
            except OSError:
                break  # a file that went away: what follows it in this file is hashed at the end
        return True


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Store:
    """One store root. Keys are directories under it; all writes go through `begin()` → `Pending`."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def key_dir(self, key: str) -> str:
        return os.path.join(self.root, validate_key(key))

    # ---- writing ----

    def begin(self, key: str) -> Pending:
        """A temp dir for a new generation of `key` (the store root is made 0700 when missing)."""
        key_dir = self.key_dir(key)
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.makedirs(key_dir, mode=0o700, exist_ok=True)
            temp = os.path.join(key_dir, f"{TEMP_PREFIX}{secrets.token_hex(6)}")
            os.mkdir(temp, 0o700)
        except OSError as err:
            raise _os_error(f"cannot create a temp dir for key {key!r} in {self.root}", err, self.root) from err
        return Pending(self, key, temp)

    @contextmanager
    def lock(self, key: str, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
        """Hold the key's node-wide lock (an flock on `<root>/.locks/<key>`: released by the kernel when its
        holder dies, so a crash never leaves it held). Waits at most `wait_s`, then StoreError."""
        locks = os.path.join(self.root, LOCK_DIR)
        try:
            os.makedirs(locks, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(locks, validate_key(key)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise _os_error(f"cannot open the lock of key {key!r}", err, self.root) from err
        try:
            give_up = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= give_up:
                        raise StoreError(f"key {key!r}: another process on this node has held its lock for over "
                                         f"{wait_s:g} s (a download into {self.root}); try again later") from None
                    time.sleep(_LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # releases the flock

    # ---- reading ----

    def keys(self) -> list[str]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(self.root, n))]

    def generations(self, key: str) -> list[int]:
        """Complete generations of `key` (those with a manifest), oldest first."""
        key_dir = self.key_dir(key)
        try:
            names = os.listdir(key_dir)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names
                      if n.isdigit() and n.isascii() and os.path.isfile(os.path.join(key_dir, n, MANIFEST)))

    def open(self, key: str, generation: int | None = None) -> Generation:
        """The manifest of a complete generation (the newest when `generation` is None); not yet verified."""
        have = self.generations(key)
        if not have:
            raise NotFound(f"no complete checkpoint for key {key!r} in {self.root}")
        number = have[-1] if generation is None else generation
        if number not in have:
            raise NotFound(f"key {key!r} has no complete generation {number} in {self.root} (have {have})")
        path = os.path.join(self.key_dir(key), str(number), MANIFEST)
        try:
            with open(path) as f:
                manifest = Manifest.from_json(f.read(), path)
        except OSError as err:
            raise StoreError(f"cannot read {path}: {err.strerror}") from err
        if manifest.key != key or manifest.generation != number:
            raise Corrupt(f"{path} names {manifest.key!r}@{manifest.generation}, not {key!r}@{number}", path)
        return Generation(self.root, key, number, manifest)

    def verify(self, generation: Generation) -> None:
        """Size and sha256 of every listed file, against the manifest; Corrupt names the first bad file."""
        verify_files(generation.path, generation.manifest.files)

    def remove_stale_temps(self, older_than_s: float = 3600.0) -> list[str]:
        """Temp dirs a crashed writer left (older than `older_than_s`); returns what was removed."""
        removed = []
        for key in self.keys():
            key_dir = os.path.join(self.root, key)
            for name in os.listdir(key_dir):
                full = os.path.join(key_dir, name)
                if name.startswith(TEMP_PREFIX) and time.time() - os.path.getmtime(full) > older_than_s:
                    shutil.rmtree(full, ignore_errors=True)
                    removed.append(full)
        return removed


def verify_files(top: str, files: Iterable[FileEntry]) -> None:
    """Every file's size, then its parts' sha256 in parallel; Corrupt names the first bad file."""
    files = list(files)
    for entry in files:
        full = os.path.join(top, entry.path)
        try:
            size = os.path.getsize(full)
        except OSError as err:
            raise Corrupt(f"{full}: listed in the manifest but cannot be read ({err.strerror})", full) from err
        if size != entry.size:
            raise Corrupt(f"{full}: size {size} does not match the manifest's {entry.size}", full)
    jobs = [(entry, offset) for entry in files for offset in _part_offsets(entry.size, entry.part_size)]
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        digests = list(pool.map(
            lambda job: sha256_range(os.path.join(top, job[0].path), job[1], job[0].part_size), jobs))
    by_file: dict[str, list[str]] = {}
    for (entry, _), digest in zip(jobs, digests, strict=True):
        by_file.setdefault(entry.path, []).append(digest)
    for entry in files:
        parts = by_file[entry.path]
        good = (parts == list(entry.parts) and _combine(parts) == entry.sha256) if entry.size > entry.part_size \
            else parts[0] == entry.sha256
        if not good:
            full = os.path.join(top, entry.path)
            raise Corrupt(f"{full}: sha256 does not match the manifest", full)


class Pending:
    """A generation being written. `commit()` makes it complete; `abort()` removes every trace."""

    def __init__(self, store: Store, key: str, temp: str) -> None:
        self.store = store
        self.key = key
        self.temp = temp

    def commit(self, identity: Identity, gpu: dict[str, Any] | None = None,
               known: dict[str, dict[int, str]] | None = None) -> Generation:
        """Hash every file (but the parts in `known`), write manifest.json last, fsync, rename into the next
        free generation number."""
        try:
            names = [n for n in _walk_files(self.temp) if n != MANIFEST]
            files = tuple(hash_files(self.temp, names, known=known))
            key_dir = os.path.dirname(self.temp)
            for _ in range(100):  # another writer of the same key may take a number first
                number = max(self.store.generations(self.key) + _numbered(key_dir), default=0) + 1
                manifest = Manifest(key=self.key, generation=number, created=now_rfc3339(),
                                    node=socket.gethostname(), identity=identity, files=files, gpu=gpu or {})
                _write_synced(os.path.join(self.temp, MANIFEST), manifest.to_json())
                final = os.path.join(key_dir, str(number))
                try:
                    os.rename(self.temp, final)
                except OSError as err:
                    if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue
                    raise
                _fsync_dir(key_dir)
                return Generation(self.store.root, self.key, number, manifest)
            raise StoreError(f"could not find a free generation number for key {self.key!r}")
        except OSError as err:
            self.abort()
            raise _os_error(f"cannot complete checkpoint {self.key!r}", err, self.store.root) from err
        except BaseException:
            self.abort()
            raise

    def commit_as(self, manifest: Manifest, text: str | None = None) -> Generation:
        """Complete a copy of a generation made elsewhere (a download from S3) under its own number: the
        files are already verified against `manifest`; it is written last and the dir renamed. StoreError
        when that number is taken locally (a local generation is never overwritten). `text` is the manifest
        as it was read (kept byte for byte); without it the manifest is written anew."""
        key_dir = os.path.dirname(self.temp)
        final = os.path.join(key_dir, str(manifest.generation))
        try:
            _write_synced(os.path.join(self.temp, MANIFEST), manifest.to_json() if text is None else text)
            try:
                os.rename(self.temp, final)
            except OSError as err:
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise StoreError(f"{final} exists locally already: the downloaded copy was dropped") from err
                raise
            _fsync_dir(key_dir)
        except OSError as err:
            self.abort()
            raise _os_error(f"cannot complete the copy of {self.key!r}@{manifest.generation}", err,
                            self.store.root) from err
        except BaseException:
            self.abort()
            raise
        return Generation(self.store.root, self.key, manifest.generation, manifest)

    def abort(self) -> None:
        shutil.rmtree(self.temp, ignore_errors=True)

    def is_full(self) -> bool:
        """Whether the store's filesystem is (nearly) out of space now: call before abort() frees it."""
        return free_bytes(self.store.root) < FULL_THRESHOLD


def link_or_copy(source: str, target: str) -> None:
    """A generation's file at `target` without copying where the filesystem allows: a hard link (the store's
    files are never rewritten in place), else, on a store that takes no hard links, a private copy."""
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, target)


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _numbered(key_dir: str) -> list[int]:
    # Numbers already taken, complete or not (a dir without manifest is never reused).
    return [int(n) for n in os.listdir(key_dir) if n.isdigit() and n.isascii()]


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(what: str, err: OSError, root: str) -> StoreError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"{what}: the store at {root} is full ({err.strerror}); the partial checkpoint was "
                         "removed: free space or point the store elsewhere")
    return StoreError(f"{what}: {err}")
