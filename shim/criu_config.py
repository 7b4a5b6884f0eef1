"""CRIU options for Kybernate's own containers, handed to runc through the `org.criu.config` annotation.

runc tells CRIU to read one configuration file on every dump and restore: the file the OCI annotation
`org.criu.config` names, else the node-wide `/etc/criu/runc.conf`. An empty annotation means no file at
all. Options in that file win over the ones runc sends over CRIU's RPC; a file that is not there is
skipped. runc reads the annotation from the bundle's config.json, at create for a dump and at restore for
a restore; so the shim names a per-container file in config.json before it forwards Create (name_in_spec).
That covers every path into runc: `ctr run`, CRI, `ctr c restore`, and `kybernate.io/restore-from` (all
Create). The file itself is written when CRIU will read it: at Create for a task created from a checkpoint,
else before the shim forwards the first Checkpoint (write_once). A container that is never checkpointed
(most) costs no file, and its Create no file creation.

A user who sets `org.criu.config` themselves keeps exactly their choice: the shim then writes nothing.
Nothing here touches `/etc/criu/runc.conf`, so other runtimes on the node see no change.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

ANNOTATION = "org.criu.config"
FILE_NAME = "kybernate-criu.conf"

# What real programs need and the stock runc leaves off (docs/real-programs.md says why, one by one):
# - link-remap: lets CRIU link an open or mapped file that was unlinked back under a temporary name
#   until the restore. Python's multiprocessing keeps its POSIX semaphores (/dev/shm/sem.*) mapped
#   after sem_unlink, and CRIU refuses such a mapping without this option.
DEFAULT_OPTIONS: tuple[str, ...] = ("link-remap",)

# One CRIU long option per line, without the leading dashes, optionally followed by one value.
_OPTION = re.compile(r"^[a-z][a-z0-9-]*( [^\n\r]+)?$")


class CriuConfigError(ValueError):
    """An option that cannot go into CRIU's configuration file; the message says which and why."""


def check_options(options: Sequence[str], origin: str) -> tuple[str, ...]:
    """Validated option lines (`name` or `name value`); a bad one is refused with the reason."""
    checked = []
    for option in options:
        line = option.strip()
        if line.startswith("--"):
            line = line[2:]
        if not _OPTION.match(line):
            raise CriuConfigError(
                f"{origin}: criu_options entry {option!r} is not a CRIU option: write one long option "
                "without dashes, optionally with one value, e.g. 'ghost-limit 16M' or 'tcp-close'"
            )
        checked.append(line)
    return tuple(checked)


def render(extra: Sequence[str] = (), cgroup_root: str | None = None) -> str:
    lines = list(DEFAULT_OPTIONS) + [o for o in extra if o not in DEFAULT_OPTIONS]
    if cgroup_root and not any(o.split()[0] == "cgroup-root" for o in extra):
        lines.append(f"cgroup-root {cgroup_root}")
    return "# written by the kybernate shim for this container; see docs/real-programs.md\n" + "\n".join(lines) + "\n"


def name_in_spec(bundle: str, spec: dict[str, Any]) -> str | None:
    """Name the container's CRIU config file (in the bundle) in config.json; the file is written later.

    Returns the file's path, or None when the spec already carries `org.criu.config` (the user's
    choice, kept as is). `spec` is the bundle's config.json as read at Create; it is updated in place.
    Costs one rewrite of config.json.
    """
    notes = spec.get("annotations")
    if not isinstance(notes, dict):
        notes = {}
    if ANNOTATION in notes:
        return None
    path = os.path.join(bundle, FILE_NAME)
    notes[ANNOTATION] = path
    spec["annotations"] = notes
    # Rewritten in place, not renamed over: ext4 pushes a file replaced by rename (or O_TRUNC) to disk
    # at once, which costs milliseconds where /run is not a tmpfs. Nothing reads config.json before we
    # forward Create, and a torn write fails that Create (nothing was started yet).
    with open(os.path.join(bundle, "config.json"), "r+", encoding="utf-8") as f:
        f.write(json.dumps(spec, separators=(",", ":")))
        f.truncate()
    return path


def write(path: str, extra: Sequence[str] = (), cgroup_root: str | None = None) -> None:
    """Write the file name_in_spec named (replacing one there): the default options, `extra`, and for a
    task created from a checkpoint where its cgroup is (`cgroup-root`, see restore_cgroup_root)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(extra, cgroup_root))


def write_once(path: str, extra: Sequence[str] = ()) -> bool:
    """Before a dump: write the file unless it is there already (written at a restore's Create, with its
    cgroup-root, or at an earlier dump). Returns whether it wrote it."""
    try:
        with open(path, "x", encoding="utf-8") as f:
            f.write(render(extra))
    except FileExistsError:
        return False
    return True


def restore_cgroup_root(spec: dict[str, Any]) -> str | None:
    """The new container's cgroup, as CRIU's `cgroup-root` for a restore, or None when it cannot be known.

    runc tells CRIU the container's cgroup per controller over RPC, naming the cgroup v2 hierarchy by an
    empty controller name, which CRIU takes for a controller of that name rather than for the default
    root: on a cgroup-v2-only node a task restored into a container other than the one dumped (a new pod,
    `kybernate.io/restore-from`) lands in a re-created copy of the dumped container's cgroup, outside its
    own limits, and runc then lists no process in the container. The default root from this file puts it
    where it belongs. cgroupfs paths are absolute; systemd ones (`slice:prefix:name`) expand as runc's
    systemd driver expands them. A relative path (runc nests it below its own cgroup) gives None.
    """
    linux = spec.get("linux")
    path = linux.get("cgroupsPath") if isinstance(linux, dict) else None
    if not isinstance(path, str) or not path or "\n" in path:
        return None
    parts = path.split(":")
    if len(parts) == 3:
        slice_name, prefix, name = parts
        unit = name if name.endswith(".slice") else (f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
        expanded = _expand_slice(slice_name or "system.slice")
        if expanded is None or "/" in unit:
            return None
        return f"{expanded.rstrip('/')}/{unit}"
    return path if path.startswith("/") and ".." not in path.split("/") else None


def _expand_slice(slice_name: str) -> str | None:
    """`a-b-c.slice` -> `/a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the root."""
    if slice_name == "-.slice":
        return "/"
    if not slice_name.endswith(".slice") or "/" in slice_name:
        return None
    stem = slice_name.removesuffix(".slice")
    if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem:
        return None
    words = stem.split("-")
    return "".join("/" + "-".join(words[: i + 1]) + ".slice" for i in range(len(words)))
