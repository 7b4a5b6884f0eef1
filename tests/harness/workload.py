"""The counter workload the integration tests checkpoint and restore, and how they read it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TypeVar

from .containerd import Containerd

# Appends 0, 1, 2, ... to /count five times a second: a restart from scratch or lost state shows as a
# break in the sequence.
COUNTER = "i=0; while true; do echo $i >> /count; i=$((i+1)); sleep 0.2; done"
T = TypeVar("T")
_exec_ids = itertools.count()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 15.0) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def read_counts(c: Containerd, name: str) -> list[int]:
    """The numbers the counter in container `name` has written so far (via ctr exec)."""
    out = c.ctr("tasks", "exec", "--exec-id", f"read{next(_exec_ids)}", name, "cat", "/count").stdout
    return [int(line) for line in out.split()]


def _task_row(c: Containerd, name: str) -> list[str] | None:
    for line in c.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields
    return None


def task_status(c: Containerd, name: str) -> str | None:
    """RUNNING, PAUSED, STOPPED, ... as `ctr tasks ls` shows it; None when there is no such task."""
    row = _task_row(c, name)
    return row[-1] if row else None


def task_pid(c: Containerd, name: str) -> int:
    row = _task_row(c, name)
    if row is None:
        raise AssertionError(f"no task {name}")
    return int(row[1])
