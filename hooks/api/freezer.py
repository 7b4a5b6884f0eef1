"""The cgroup freezer of a task, read and set through its init process's cgroup (v1 freezer or v2).

Used only to repair what a dead CRIU leaves behind: runc's shim keeps its own idea of "paused", and a
dump that dies can leave the cgroup's real freezer state on the other side (finding 3 of issue 9).
Blocking (small kernel files, a bounded wait for the freeze to settle): call from a thread.
"""

from __future__ import annotations

import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SETTLE_S = 5.0


def cgroup_dir(pid: int, root: Path = CGROUP_ROOT) -> Path | None:
    """The process's freezer cgroup directory (v1 freezer hierarchy if mounted, else the unified one).
    Never the root cgroup: that would name every process of the node."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    entries = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    for _, controllers, path in entries:
        if "freezer" in controllers.split(",") and path not in ("", "/"):
            return root / "freezer" / path.lstrip("/")
    if (root / "cgroup.controllers").exists():
        for hier, controllers, path in entries:
            if hier == "0" and controllers == "" and path not in ("", "/"):
                return root / path.lstrip("/")
    return None


def is_frozen(directory: Path) -> bool:
    v1 = directory / "freezer.state"
    if v1.exists():
        return v1.read_text().strip() in ("FROZEN", "FREEZING")
    return "frozen 1" in (directory / "cgroup.events").read_text()


def set_frozen(directory: Path, frozen: bool) -> None:
    """Freeze or thaw, and wait (bounded) until the kernel says it is done."""
    v1 = directory / "freezer.state"
    if v1.exists():
        v1.write_text("FROZEN" if frozen else "THAWED")
    else:
        (directory / "cgroup.freeze").write_text("1" if frozen else "0")
    deadline = time.monotonic() + SETTLE_S
    while is_frozen(directory) != frozen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"cgroup {directory} did not {'freeze' if frozen else 'thaw'} within {SETTLE_S:g} s")
        time.sleep(0.01)
