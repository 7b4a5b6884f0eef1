"""A container's rootfs diff against its image, as a plain tar plus the list of deleted paths.

For the overlayfs snapshotter the snapshot's upper dir is read directly (fast, no copy through containerd);
overlay whiteouts (0/0 character devices) become the deleted paths. Other snapshotters go through
containerd's Diff service: a view of the parent, Diff.Diff into the content store under a lease the caller
holds, and the blob read back with its whiteouts turned into deleted paths.

Blocking (file and gRPC I/O): hookd calls these in an executor.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from kybernate.api import containerd_api_pb2 as pb
from kybernate.hooks.api.checkpoint import DELETED_FILES, OPAQUE_WHITEOUT, ROOTFS_DIFF, WHITEOUT_PREFIX

from .client import ContainerdClient, ContainerdError


class RootfsError(RuntimeError):
    """The rootfs diff could not be taken; the message says what could not be read."""


class Cancelled(RootfsError):
    """The caller gave up (its deadline passed) while the diff was being written."""


def write_rootfs_diff(client: ContainerdClient, container: pb.ContainerRecord, workdir: str, *,
                      warn: Callable[[str], None], cancelled: threading.Event | None = None) -> int:
    """`rootfs-diff.tar` (and `deleted.files` when the container deleted image files) in `workdir`;
    returns the tar's size (0 when the container has no snapshot)."""
    if not container.snapshot_key:
        return 0
    target = os.path.join(workdir, ROOTFS_DIFF)
    mounts = client.snapshot_mounts(container.snapshotter, container.snapshot_key)
    upper = overlay_upperdir(mounts)
    if upper is not None:
        deleted = tar_upperdir(upper, target, cancelled)
    else:
        lease = client.create_lease()
        try:
            blob = diff_blob(client, container, lease, warn)
            deleted = copy_diff(client, blob, target, warn) if blob else []
        finally:
            client.delete_lease(lease)
    if deleted:
        with open(os.path.join(workdir, DELETED_FILES), "w") as f:
            json.dump(deleted, f)
    return os.path.getsize(target) if os.path.exists(target) else 0


def overlay_upperdir(mounts: list[pb.Mount]) -> str | None:
    if len(mounts) != 1 or mounts[0].type != "overlay":
        return None
    for option in mounts[0].options:
        if option.startswith("upperdir="):
            return str(option).removeprefix("upperdir=")
    return None


def tar_upperdir(upper: str, target: str, cancelled: threading.Event | None = None) -> list[str]:
    """The overlay upper dir as a plain tar; whiteouts (0/0 char devices) become the returned deleted paths.

    An opaque dir (the container replaced a whole image dir) is stored with its new content; files of the
    image's version it removed are kept on restore, as with containerd's diff (docs/store.md). `cancelled`
    is checked before every entry, so a caller past its deadline gets its thread back promptly.
    """
    deleted: list[str] = []
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(upper):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled("the rootfs diff was cancelled (deadline)")
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, upper)
                st = os.lstat(full)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    deleted.append("/" + rel)
                    continue
                if stat.S_ISSOCK(st.st_mode):
                    continue  # a socket cannot be archived; the process recreates it on restore
                tar.add(full, arcname=rel, recursive=False)
    return deleted


def diff_blob(client: ContainerdClient, container: pb.ContainerRecord, lease: str,
              warn: Callable[[str], None]) -> pb.Descriptor | None:
    """Diff.Diff of the container's snapshot against a view of its parent (the image), into the content store."""
    if not container.snapshot_key:
        return None
    snapshotter = container.snapshotter
    info = client.stat_snapshot(snapshotter, container.snapshot_key)
    view_key = f"kybernate-checkpoint-view-{secrets.token_hex(6)}"
    left: list[pb.Mount] = []
    viewed = False
    try:
        if info.parent:
            left = client.view_snapshot(snapshotter, view_key, info.parent, lease=lease)
            viewed = True
        right = client.snapshot_mounts(snapshotter, container.snapshot_key)
        return client.diff(left, right, lease=lease)
    finally:
        if viewed:
            try:
                client.remove_snapshot(snapshotter, view_key)
            except ContainerdError as err:
                warn(f"could not remove the snapshot view {view_key}: {err}")


def copy_diff(client: ContainerdClient, descriptor: pb.Descriptor, target: str,
              warn: Callable[[str], None]) -> list[str]:
    """Copy the diff blob into `target` minus its whiteouts, which become the returned deleted paths."""
    deleted: list[str] = []
    reader = ChunkReader(client.read_content(descriptor.digest))
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 20), mode="r|") as src, \
                tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as dst:
            for member in src:
                directory, base = os.path.split(member.name.lstrip("./").rstrip("/"))
                if base == OPAQUE_WHITEOUT:
                    # The directory was replaced as a whole; its new content follows in the diff.
                    warn(f"/{directory} was replaced; files of the image's version of it that the container "
                         "removed are kept on restore")
                    continue
                if base.startswith(WHITEOUT_PREFIX):
                    deleted.append("/" + os.path.join(directory, base[len(WHITEOUT_PREFIX):]))
                    continue
                dst.addfile(member, src.extractfile(member) if member.isreg() else None)
    except (tarfile.TarError, OSError) as err:
        raise RootfsError(f"cannot read the rootfs diff {descriptor.digest}: {err}") from None
    return deleted


class ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (a Content.Read stream), for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        self.total += n
        return n
