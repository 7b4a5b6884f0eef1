"""Durable intent: what the GPU state of a task should be, and the step in flight, in a small file.

The shim writes one file per GPU task before and after every GPU step (tmp + fsync + rename, so a
reader sees the old or the new record, never a torn one). kybernate-hookd's reconciler reads the same
directory to bring back a process whose GPU state was left LOCKED or CHECKPOINTED by a crash
(docs/lifecycle.md has the format and the rules). Standard library only: hookd imports it too.

    <intent_dir>/<namespace>/<container_id>.json
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
# The GPU state the task should have: on the GPU, parked in host RAM (paused), or checkpointed for a dump.
RUNNING = "running"
PARKED = "parked"
DUMP = "dump"
DESIRED = (RUNNING, PARKED, DUMP)
# containerd's identifiers ([A-Za-z0-9] then [A-Za-z0-9_.-]); anything else is never used as a file name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
# An intent file is a few hundred bytes plus the manifest; anything larger is not ours.
MAX_BYTES = 1 << 20


class IntentError(ValueError):
    """An intent file or name is malformed."""


@dataclass(frozen=True, slots=True)
class Intent:
    namespace: str
    container_id: str
    bundle: str
    desired: str  # RUNNING, PARKED or DUMP
    step: str | None  # the GPU action in flight (checkpoint, restore, ...) or None when settled
    phase: str  # the shim's lifecycle phase after the last completed step
    shim_pid: int  # the shim serving the task: a dead shim means nobody else will finish the step
    init_pid: int = 0  # the task's init process (0 before Start); its cgroup holds every process
    pids: tuple[int, ...] = ()  # the task's processes as of the last step
    manifest: dict[str, Any] | None = None  # the GPU manifest of the last checkpoint (VRAM pre-check)
    shim_start: int = 0  # the shim's start time (procfs.start_time): tells it from a later process of its pid
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["pids"] = list(self.pids)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Intent:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise IntentError(f"not JSON: {err}") from err
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise IntentError(f"not an intent record of version {FORMAT_VERSION}")
        try:
            intent = cls(
                namespace=_str(data, "namespace"), container_id=_str(data, "container_id"),
                bundle=_str(data, "bundle"), desired=_str(data, "desired"),
                step=None if data.get("step") is None else _str(data, "step"), phase=_str(data, "phase"),
                shim_pid=_int(data.get("shim_pid")), shim_start=_int(data.get("shim_start", 0)),
                init_pid=_int(data.get("init_pid", 0)),
                pids=tuple(_int(p) for p in data.get("pids") or ()),
                manifest=data.get("manifest") if isinstance(data.get("manifest"), dict) else None,
            )
        except (TypeError, ValueError) as err:
            raise IntentError(str(err)) from err
        if intent.desired not in DESIRED:
            raise IntentError(f"desired={intent.desired!r}: want one of {', '.join(DESIRED)}")
        return intent


def _str(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise IntentError(f"{key}: want a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IntentError(f"want a non-negative integer, got {value!r}")
    return value


def path_of(intent_dir: str, namespace: str, container_id: str) -> Path:
    for what, name in (("namespace", namespace), ("container id", container_id)):
        if not _NAME.match(name):
            raise IntentError(f"{what} {name!r} cannot name an intent file")
    return Path(intent_dir) / namespace / f"{container_id}.json"


def write(intent_dir: str, intent: Intent) -> None:
    """Atomically replace the task's intent file (blocking: a small write and two fsyncs)."""
    path = path_of(intent_dir, intent.namespace, intent.container_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = intent.to_json().encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read(path: Path) -> Intent:
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise IntentError(f"{path}: larger than {MAX_BYTES} bytes")
    return Intent.from_json(data.decode(errors="replace"))


def remove(intent_dir: str, namespace: str, container_id: str) -> None:
    try:
        path_of(intent_dir, namespace, container_id).unlink()
    except (FileNotFoundError, IntentError):
        pass


def scan(intent_dir: str) -> Iterator[Path]:
    """Every intent file under the directory (namespace subdirectories, *.json)."""
    root = Path(intent_dir)
    if not root.is_dir():
        return
    for ns in sorted(root.iterdir()):
        if ns.is_dir() and _NAME.match(ns.name):
            yield from sorted(p for p in ns.glob("*.json") if not p.name.startswith("."))
