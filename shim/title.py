"""A process's command line as /proc/<pid>/cmdline shows it, rewritten in place.

Shim processes are recognised by their command line (`containerd-shim-kybernate-v1 -namespace … -address …
start`): by ps, by containerd's tooling, by the installer's check for running shims. A process forked from
kybernate-shimd, or a shim run through the `python -IS` launcher, would otherwise show the interpreter's.
"""

from __future__ import annotations

import ctypes
import os

# Set by remember_area() in a process that forks many title-setters (kybernate-shimd): a fork keeps the
# addresses, so its children need not read /proc for them (a fraction of a ms on every command).
_area: tuple[int, int] | None = None


def remember_area() -> None:
    global _area
    _area = None
    _area = _argv_area()


def _argv_area() -> tuple[int, int]:
    """Start and end address of this process's argv strings (fields 48 and 49 of /proc/self/stat)."""
    if _area is not None:
        return _area
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[45]), int(fields[46])  # `fields` starts at field 3


def room() -> int:
    start, end = _argv_area()
    return end - start


def set_title(argv: list[str]) -> bool:
    """Make /proc/<pid>/cmdline read `argv` (children forked later inherit it). False when it does not fit:
    the kernel gives no more room than the original command line had."""
    start, end = _argv_area()
    data = b"\0".join(os.fsencode(a) for a in argv) + b"\0"
    if len(data) > end - start:
        return False
    ctypes.memmove(start, data + b"\0" * (end - start - len(data)), end - start)
    return True
