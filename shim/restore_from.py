"""Restore a new container from a checkpoint archive named by the `kybernate.io/restore-from` annotation.

The archive is what CRI's CheckpointContainer writes (checkpointctl's layout): `checkpoint/` holds the
CRIU images (and Kybernate's `kybernate.json` for GPU containers), `rootfs-diff.tar` the files the
container had changed, `deleted.files` (when present) a JSON list of files it had removed.

The shim does the restore itself because containerd's own restore-inside-CreateContainer is off by
default from 2.2 and absent before 2.1: unpack the archive into the bundle, hand the runc shim the CRIU
images as the task's checkpoint (runc then restores at Start instead of starting), and lay the rootfs
diff over the freshly mounted rootfs before Start.

Archives are only read from one directory (`[kybernate] checkpoint_dir`): a reference that resolves
outside it, through `..` or a symlink, is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from typing import Any

from kybernate.hooks.api.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_DUMP,
    DELETED_FILES,
    OPAQUE_WHITEOUT,
    ROOTFS_DIFF,
    WHITEOUT_PREFIX,
)

ANNOTATION = "kybernate.io/restore-from"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CONTAINER_NAME = "io.kubernetes.cri.container-name"
WORKDIR_NAME = "kybernate-restore"
# Members we take from an archive; anything else in it is left alone.
CHECKPOINT_PREFIX = CHECKPOINT_DIR + "/"


class RestoreError(Exception):
    """The archive cannot be used; the message names the archive and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class RestorePlan:
    archive: str
    checkpoint_dir: str  # the CRIU images, handed to the runc shim as CreateTaskRequest.checkpoint
    rootfs_diff: str | None
    deleted_files: tuple[str, ...]


def requested(spec: dict[str, Any]) -> str | None:
    """The archive reference for this container, or None (no annotation, or the pod's sandbox)."""
    notes = spec.get("annotations") or {}
    value = notes.get(ANNOTATION)
    if value is None or notes.get(CONTAINER_TYPE) == "sandbox":
        return None
    if not str(value).strip():
        raise RestoreError(f"annotation {ANNOTATION} is empty: name a checkpoint archive")
    return str(value)


def resolve(reference: str, checkpoint_dir: str) -> str:
    """The archive's real path, which must lie inside `checkpoint_dir`.

    Blocking (it walks the filesystem): call it in a thread, after annotation_limits.check bounded
    `reference`.
    """
    if "\0" in reference:
        raise RestoreError(f"{ANNOTATION}={reference!r}: a path cannot contain a NUL byte")
    root = os.path.realpath(checkpoint_dir)
    candidate = reference if os.path.isabs(reference) else os.path.join(root, reference)
    real = os.path.realpath(candidate)
    if os.path.commonpath([root, real]) != root or real == root:
        raise RestoreError(
            f"{ANNOTATION}={reference!r} resolves to {real}, outside the checkpoint directory {root}: "
            "archives are only read from there ([kybernate] checkpoint_dir)"
        )
    if not os.path.isfile(real):
        raise RestoreError(f"{ANNOTATION}={reference!r}: no checkpoint archive at {real}")
    return real


def unpack(archive: str, workdir: str) -> RestorePlan:
    """Check the archive is a container checkpoint and unpack what a restore needs into `workdir`."""
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(workdir, mode=0o700)
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if _wanted(m.name)]
            names = {m.name.lstrip("./") for m in members}
            if CHECKPOINT_PREFIX + "inventory.img" not in names:
                raise RestoreError(
                    f"{archive} is not a container checkpoint archive (no {CHECKPOINT_PREFIX}inventory.img): "
                    "use an archive written by CRI CheckpointContainer"
                )
            # The "data" filter refuses absolute names, `..`, links out of the tree and device files.
            tar.extractall(workdir, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as err:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RestoreError(f"cannot read checkpoint archive {archive}: {err}") from err
    except RestoreError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    rootfs_diff = os.path.join(workdir, ROOTFS_DIFF)
    return RestorePlan(
        archive=archive,
        checkpoint_dir=os.path.join(workdir, CHECKPOINT_DIR),
        rootfs_diff=rootfs_diff if os.path.isfile(rootfs_diff) else None,
        deleted_files=read_deleted_files(os.path.join(workdir, DELETED_FILES), archive),
    )


def archived_container_name(plan: RestorePlan) -> str | None:
    """The container name recorded in the archive, if it has one (CRI's `<name>_<pod>_...`)."""
    path = os.path.join(os.path.dirname(plan.checkpoint_dir), CONFIG_DUMP)
    try:
        with open(path) as f:
            name = json.load(f).get("name", "")
    except (OSError, ValueError, AttributeError):
        return None
    return str(name).split("_", 1)[0] or None


def apply_rootfs(plan: RestorePlan, rootfs: str) -> None:
    """Lay the checkpointed container's file changes over the new container's mounted rootfs.

    Deletions come first (`deleted.files`, and the overlay whiteouts a diff may carry instead:
    `.wh.<name>` removes <name>, `.wh..wh..opq` empties its directory), then the changed files.
    """
    try:
        deletions = list(plan.deleted_files)
        opaque_dirs: list[str] = []
        members: list[tarfile.TarInfo] = []
        if plan.rootfs_diff is not None:
            with tarfile.open(plan.rootfs_diff) as tar:
                for member in tar.getmembers():
                    parent, base = os.path.split(member.name.lstrip("./"))
                    if base == OPAQUE_WHITEOUT:
                        opaque_dirs.append(parent)
                    elif base.startswith(WHITEOUT_PREFIX):
                        deletions.append(os.path.join(parent, base[len(WHITEOUT_PREFIX):]))
                    else:
                        members.append(member)
                for directory in opaque_dirs:
                    target = _inside(rootfs, directory, plan.archive)
                    for entry in os.listdir(target) if os.path.isdir(target) else ():
                        _remove(os.path.join(target, entry))
                for name in deletions:
                    _remove(_inside(rootfs, name, plan.archive))
                # The "data" filter refuses absolute names, `..`, links out of the tree and device files.
                tar.extractall(rootfs, members=members, filter="data")
        else:
            for name in deletions:
                _remove(_inside(rootfs, name, plan.archive))
    except (tarfile.TarError, OSError) as err:
        raise RestoreError(f"cannot apply the rootfs changes of {plan.archive}: {err}") from err


def _inside(rootfs: str, name: str, archive: str) -> str:
    """`name` under `rootfs`, following symlinks in its parents only: the entry itself is what we act on."""
    root = os.path.realpath(rootfs)
    parent, base = os.path.split(name.strip("/"))
    real_parent = os.path.realpath(os.path.join(root, parent))
    if os.path.commonpath([root, real_parent]) != root or base in ("", ".", ".."):
        raise RestoreError(f"{archive}: {name!r} lies outside the container's rootfs")
    return os.path.join(real_parent, base)


def _remove(path: str) -> None:
    """Remove a file, link or directory tree; a symlink is removed itself, never what it points to."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _wanted(name: str) -> bool:
    name = name.lstrip("./")
    return name.startswith(CHECKPOINT_PREFIX) or name in (CHECKPOINT_DIR, ROOTFS_DIFF, DELETED_FILES, CONFIG_DUMP)


def read_deleted_files(path: str, archive: str) -> tuple[str, ...]:
    """The paths a checkpoint's deleted.files lists; () when there is none."""
    try:
        with open(path) as f:
            names = json.load(f)
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as err:
        raise RestoreError(f"{archive}: {DELETED_FILES} is not a JSON list: {err}") from err
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RestoreError(f"{archive}: {DELETED_FILES} is not a JSON list of paths")
    return tuple(names)
