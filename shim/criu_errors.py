"""CRIU's own reason for a failed dump or restore, in one line, read from the log runc leaves behind.

When CRIU refuses a container, the runc shim only says "criu failed: type NOTIFY errno 0" and names a log
file. The reason is in that log: the first `Error (file:line): ...` lines, and the task CRIU was working
on. Where the log lies (containerd's runc shim, 1.6 to 2.x):
- dump: CRIU writes dump.log into a temporary work dir; on failure the runc shim copies it to
  `<bundle>/criu-dump.log` before removing the work dir.
- restore (at Start): the work dir is `<bundle>/work` (containerd's per-task state dir), so
  `<bundle>/work/restore.log`, which stays until the task is deleted.
A log older than the call that failed is not this failure's: it is ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

DUMP_LOG = "criu-dump.log"
RESTORE_LOG = os.path.join("work", "restore.log")
# Bounds: how much of a log is scanned (CRIU logs at level 4 grow with the process tree), and how many
# error lines make up the reason (the first is the cause; the second often names the resource).
MAX_SCAN_BYTES = 64 << 20
MAX_ERRORS = 2
MAX_REASON_CHARS = 400
# File times come from the kernel's coarse clock, which may trail time.time() by a tick.
CLOCK_SLACK_S = 1.0

# Error lines CRIU logs on every run where it lacks CAP_SYS_RESOURCE, and then goes on: not a reason.
HARMLESS = ("rlimit: Can't setup RLIMIT_NOFILE",)

_ERROR = re.compile(r"^\(\s*[\d.]+\)\s+(?:(\d+): )?Error \([^)]*\): (.*)$")
_DUMPING = re.compile(r"Dumping task \(pid: (\d+)(?: comm: ([^)]*))?\)")
_PID_IN_TEXT = re.compile(r"\b(\d+)'s\b|\bpid[: ]+(\d+)")


@dataclass(frozen=True, slots=True)
class CriuFailure:
    """What CRIU said: the task it names (real pid on dump, the container's own pid on restore)."""

    reason: str
    pid: int | None = None
    comm: str | None = None

    def describe(self) -> str:
        who = "" if self.pid is None else f"pid {self.pid}" + (f" ({self.comm})" if self.comm else "") + ": "
        return who + self.reason


def parse(lines: Iterable[str], *, live_pids: bool = False) -> CriuFailure | None:
    """The first error lines of a CRIU log; None when it holds none.

    live_pids: the pids in the log are host pids of processes still alive (a failed dump leaves them
    running), so a name the log lacks is read from /proc.
    """
    current: tuple[int, str | None] | None = None
    errors: list[str] = []
    pid: int | None = None
    comm: str | None = None
    for raw in lines:
        line = raw.rstrip("\n")
        dumping = _DUMPING.search(line)
        if dumping:
            current = (int(dumping.group(1)), dumping.group(2))
            continue
        match = _ERROR.match(line)
        if not match:
            continue
        message = " ".join(match.group(2).split())
        if message in errors or message.startswith(HARMLESS):
            continue
        if not errors:
            pid, comm = _who(message, match.group(1), current)
        errors.append(message)
        if len(errors) == MAX_ERRORS:
            break
    if not errors:
        return None
    if pid is not None and comm is None and live_pids:
        comm = _comm(pid)
    reason = "; ".join(errors)
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return CriuFailure(reason=reason, pid=pid, comm=comm)


def from_log(path: str, since: float, *, live_pids: bool = False) -> CriuFailure | None:
    """The failure recorded in the log at `path` if it was written at or after `since` (a time.time())."""
    try:
        if os.stat(path).st_mtime < since - CLOCK_SLACK_S:
            return None
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse(_bounded(f), live_pids=live_pids)
    except OSError:
        return None


def explain(action: str, message: str, bundle: str, since: float) -> str:
    """The error text for a failed CRIU `action` ("dump" or "restore"): CRIU's reason first, then where
    the full log is; `message` (the runc shim's own) unchanged when no fresh log says more."""
    log = os.path.join(bundle, DUMP_LOG if action == "dump" else RESTORE_LOG)
    failure = from_log(log, since, live_pids=action == "dump")
    if failure is None:
        return message
    return f"criu {action} failed: {failure.describe()} (CRIU log: {log})"


def _bounded(f: Iterable[str]) -> Iterator[str]:
    seen = 0
    for line in f:
        seen += len(line)
        if seen > MAX_SCAN_BYTES:
            return
        yield line


def _who(message: str, prefix: str | None, current: tuple[int, str | None] | None) -> tuple[int | None, str | None]:
    named = _PID_IN_TEXT.search(message)
    if named:
        pid = int(named.group(1) or named.group(2))
        return pid, current[1] if current and current[0] == pid else None
    if current is not None:
        return current
    if prefix:
        return int(prefix), None
    return None, None


def _comm(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None
