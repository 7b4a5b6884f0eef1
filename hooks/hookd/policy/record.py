"""What hookd remembers of a workload's parks across its own restarts: `<state_dir>/<namespace>/<id>.json`.

containerd (the task is PAUSED) and the shim's intent (desired: parked) already say that a workload is parked;
this file says that standby parked it (so a restarted hookd goes on waking it on connect), why, and how long
the last park and wake took. Written atomically (tmp + rename); removed when the workload is gone. Blocking:
call through a thread.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kybernate.hooks.api import intent

MAX_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class Record:
    namespace: str
    container_id: str
    parked: bool  # parked by standby (policy, arbiter or `kybernate park`) and not woken since
    trigger: str = ""  # idle | arbiter | api: who parked it
    reason: str = ""  # why, in words (the idle signals, the arbiter's decision)
    parked_at: float = 0.0  # wall clock (time.time()) of the last park
    park_s: float = 0.0  # duration of the last park (containerd Pause)
    wake_s: float = 0.0  # duration of the last wake (containerd Resume)
    woken_by: str = ""  # connect | api | arbiter (a wake made room for) of the last wake
    parks: int = 0
    tier: str = ""  # ram | disk of the last park
    key: str = ""  # disk: the store key and generation the workload is hibernated in
    generation: int = 0
    bundle: str = ""  # disk: the task's bundle (its spec), while no intent file names it
    gpus: dict[str, int] | None = None  # disk: VRAM per GPU it needs back (the arbiter's input at its wake)


def path_of(state_dir: str, namespace: str, container_id: str) -> Path:
    return intent.path_of(state_dir, namespace, container_id)  # the same name rules as the intent files


def write(state_dir: str, record: Record) -> None:
    path = path_of(state_dir, record.namespace, record.container_id)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record), sort_keys=True))
    os.replace(tmp, path)


def read(state_dir: str, namespace: str, container_id: str) -> Record | None:
    """The record, or None when there is none or it is not one of ours."""
    try:
        path = path_of(state_dir, namespace, container_id)
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_BYTES))
        return Record(**{k: data[k] for k in Record.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError, intent.IntentError):
        return None


def remove(state_dir: str, namespace: str, container_id: str) -> None:
    try:
        path_of(state_dir, namespace, container_id).unlink()
    except (FileNotFoundError, intent.IntentError):
        pass


def known(state_dir: str) -> list[tuple[str, str]]:
    return [(p.parent.name, p.stem) for p in intent.scan(state_dir)]
