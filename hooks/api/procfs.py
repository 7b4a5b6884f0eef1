"""What /proc and the cgroup filesystems say about processes: the one place Kybernate reads them.

hookd asks which pids a container's cgroup holds and whether one is stopped or frozen (the driver must
not be called then); the shim's `delete` finds a runc shim by the socket it listens on; the tests find
what a shim left behind. These are reads of small kernel files (microseconds, never blocking on I/O), so
they run on the event loop directly; driver calls never do.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from kybernate.hooks.api.errors import InvalidRequest

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path | str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def pids_of_cgroup(cgroup_path: str, root: Path = CGROUP_ROOT) -> list[int]:
    """Every pid in the cgroup and its descendants.

    `cgroup_path` is either a directory under the cgroup filesystem or an OCI cgroupsPath
    ("/kubepods/pod…/…"), which is looked up in the unified hierarchy and each v1 hierarchy.
    """
    candidates = [Path(cgroup_path)]
    relative = cgroup_path.lstrip("/")
    candidates += [root / relative]
    if root.is_dir():
        candidates += [h / relative for h in sorted(root.iterdir()) if h.is_dir()]
    for directory in candidates:
        if (directory / "cgroup.procs").is_file():
            pids: set[int] = set()
            for dirpath, _dirs, files in os.walk(directory):
                if "cgroup.procs" in files:
                    pids.update(int(p) for p in _read(Path(dirpath) / "cgroup.procs").split() if p.isdigit())
            return sorted(pids)
    raise InvalidRequest(f"cgroup {cgroup_path!r} not found under {root} (no cgroup.procs): pass the container's pids")


def _mounts() -> list[tuple[str, str, set[str]]]:
    out = []
    for line in _read("/proc/self/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[1], parts[2], set(parts[3].split(","))))
    return out


def paused(pid: int) -> str | None:
    """Why the driver could not reach this process right now, or None.

    The driver blocks on a stopped or cgroup-frozen target until it runs again, whatever timeout it
    was given (measured on driver 580): a frozen container must be refused, not called.
    """
    stat = _read(f"/proc/{pid}/stat")
    state = stat.rpartition(")")[2].split()[:1]
    if state and state[0] in ("T", "t"):
        return "stopped (SIGSTOP or a tracer such as CRIU)"
    mounts = _mounts()
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            for mnt, kind, _opts in mounts:
                if kind == "cgroup2":
                    base = Path(mnt + path)
                    if _read(base / "cgroup.freeze").strip() == "1" or "frozen 1" in _read(base / "cgroup.events"):
                        return f"frozen (cgroup v2 {base})"
        elif "freezer" in controllers.split(","):
            for mnt, kind, opts in mounts:
                if kind == "cgroup" and "freezer" in opts:
                    state_file = Path(mnt + path) / "freezer.state"
                    value = _read(state_file).strip()
                    if value in ("FROZEN", "FREEZING"):
                        return f"frozen ({state_file} is {value})"
    return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    state = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()[:1]
    return bool(state) and state[0] not in ("Z", "X")


def start_time(pid: int) -> int:
    """When the process started (clock ticks since boot; /proc/<pid>/stat field 22), 0 when it is gone.
    With the pid it names one process for good: a pid reused later has another start time."""
    fields = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else 0


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One line of /proc/<pid>/maps."""

    start: int
    end: int
    perms: str  # "rw-s", "r-xp", ...
    offset: int
    path: str  # "" for anonymous memory; "[vdso]" and friends as the kernel names them

    @property
    def text(self) -> str:
        return f"{self.start:x}-{self.end:x} {self.perms} {self.path}".rstrip()


def maps(pid: int) -> list[MapEntry]:
    """The process's mappings; [] when it is gone."""
    out = []
    for line in _read(f"/proc/{pid}/maps").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, _, end = parts[0].partition("-")
        path = parts[5] if len(parts) > 5 else ""
        out.append(MapEntry(int(start, 16), int(end, 16), parts[1], int(parts[2], 16), path))
    return out


def open_fds(pid: int) -> dict[int, str]:
    """fd number -> what it points to (readlink of /proc/<pid>/fd/N); {} when the process is gone."""
    out: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except (OSError, ValueError):
            continue  # closed meanwhile
    return out


def parent(pid: int) -> int:
    """Parent pid, 0 when unknown."""
    fields = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


def comm(pid: int) -> str:
    return _read(f"/proc/{pid}/comm").strip()


@dataclass(frozen=True, slots=True)
class Process:
    ppid: int
    argv: tuple[str, ...]  # empty for kernel threads and zombies


def processes() -> dict[int, Process]:
    """Every process that still exists, in one pass over /proc."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _read(f"/proc/{entry.name}/stat").rpartition(")")[2].split()
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if len(fields) < 2:
            continue
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        found[int(entry.name)] = Process(int(fields[1]), argv)
    return found


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (by parent pid), root first; empty when root is gone."""
    table = processes()
    if root not in table:
        return []
    children: dict[int, list[int]] = {}
    for pid, process in table.items():
        children.setdefault(process.ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(sorted(children.get(pid, ()), reverse=True))
    return found


def open_files(pid: int) -> list[str]:
    """What the process's file descriptors point at (paths, or `socket:[inode]` and the like)."""
    targets = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.EACCES, errno.ESRCH):
            raise
    return targets


def socket_inodes_by_pid() -> dict[int, set[int]]:
    """pid -> inodes of the sockets it holds open, for every process."""
    found: dict[int, set[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            inodes = {int(t[8:-1]) for t in open_files(int(entry.name)) if t.startswith("socket:[")}
            if inodes:
                found[int(entry.name)] = inodes
    return found


def unix_sockets() -> dict[int, str]:
    """inode -> path of every named unix socket on the host (abstract ones start with "@")."""
    table = {}
    for line in _read("/proc/net/unix").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8:
            table[int(fields[6])] = fields[7]
    return table
