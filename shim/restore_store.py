"""Restore from the checkpoint store: `kybernate.io/restore-from: store:<key>` or `store:<key>@<generation>`.

The newest complete generation of the key (or the one named) is opened in the node's store
(`$KYBERNATE_STORE` in containerd's environment, default /var/lib/kybernate/store: the same root
`kybernate checkpoint` writes to), every file the manifest lists is checked for size and sha256, and only
then is a restore plan handed on, exactly like an unpacked archive's (shim/restore_from.py): the runc
child restores from `checkpoint/` at Start, the rootfs diff is laid over the new rootfs before.

Nothing is copied: the plan's dir is `<store>/.restore/<container>-<random>/`, holding hard links to the
generation's files. It must be a real dir on the store's filesystem: CRIU writes its restore stats next to
the images (a generation never changes once complete), and it opens some images only after entering the
container's mount namespace, where a symlink to the store would not resolve. The store is root's (0700),
so what was verified is what CRIU reads. Link dirs are only needed until runc has restored at Start;
those older than an hour are swept by the next restore.

When the generation is not in the local store and the S3 tier is configured (docs/store.md, "S3 tier"), it is
downloaded into the local store first (hooks/api/store_s3.py, verified against its manifest before it is
renamed into place); boto3 is imported only then.

Imported only when the annotation names the store: the shim's start path never pays for it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time

from kybernate.hooks.api import store as store_layout
from kybernate.hooks.api.checkpoint import DELETED_FILES, ROOTFS_DIFF

from .restore_from import RestoreError, RestorePlan, read_deleted_files

PREFIX = "store:"
STORE_ENV = "KYBERNATE_STORE"
DEFAULT_STORE = "/var/lib/kybernate/store"
LINK_DIRS = ".restore"
LINK_DIR_MAX_AGE_S = 3600.0


def is_store_reference(reference: str) -> bool:
    return reference.startswith(PREFIX)


def store_root() -> str:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


class NothingToRestore(RestoreError):
    """The key has no complete generation on any tier (or not the one named)."""


def prepare_latest(key: str, container_id: str, root: str | None = None) -> RestorePlan | None:
    """`kybernate.io/resume: latest`: the plan for the key's newest complete generation (local, or S3 when that
    has a newer one), or None when no tier has one. Any other problem (a damaged generation, S3 unreachable
    with no local copy) is a RestoreError: the Create fails rather than start over what may have progress."""
    try:
        return prepare(PREFIX + key, container_id, root)
    except NothingToRestore:
        return None


def prepare(reference: str, container_id: str, root: str | None = None) -> RestorePlan:
    """Open, verify and link the generation `reference` names; RestoreError on any problem."""
    root = root or store_root()
    links = os.path.join(root, LINK_DIRS)
    _sweep(links)
    workdir = os.path.join(links, f"{container_id[:64]}-{secrets.token_hex(4)}")
    try:
        key, number = store_layout.parse_reference(reference.removeprefix(PREFIX))
        store = store_layout.Store(root)
        generation = _open_or_download(store, key, number)
        name = f"{PREFIX}{key}@{generation.number}"
        store.verify(generation)
    except store_layout.Corrupt as err:
        raise RestoreError(f"{reference}: refused, the checkpoint is damaged: {err}") from err
    except store_layout.NotFound as err:
        raise NothingToRestore(f"{reference}: {err}") from err
    except store_layout.StoreError as err:
        raise RestoreError(f"{reference}: {err}") from err
    try:
        os.makedirs(workdir, mode=0o700)
        for entry in generation.manifest.files:
            target = os.path.join(workdir, entry.path)
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            store_layout.link_or_copy(os.path.join(generation.path, entry.path), target)
        if not os.path.exists(os.path.join(workdir, "checkpoint", "inventory.img")):
            raise RestoreError(f"{name} has no checkpoint/inventory.img: it is not a container checkpoint")
        deleted = read_deleted_files(os.path.join(workdir, DELETED_FILES), name)
    except OSError as err:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RestoreError(f"{name}: cannot prepare the restore in {workdir}: {err}") from err
    except RestoreError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    rootfs_diff = os.path.join(workdir, ROOTFS_DIFF)
    return RestorePlan(
        archive=name,
        checkpoint_dir=os.path.join(workdir, "checkpoint"),
        rootfs_diff=rootfs_diff if os.path.exists(rootfs_diff) else None,
        deleted_files=deleted,
    )


def _open_or_download(store: store_layout.Store, key: str, number: int | None) -> store_layout.Generation:
    """The local generation; when it is not local and the S3 tier is configured ($KYBERNATE_S3_BUCKET in
    containerd's environment), a verified download of it first. Without a generation number, a newer
    remote generation wins over an older local one (another node may have checkpointed since)."""
    missing: store_layout.NotFound | None = None
    try:
        local = store.open(key, number)
    except store_layout.NotFound as err:
        local, missing = None, err
    if local is not None and number is not None:
        return local
    from kybernate.hooks.api import store_s3  # boto3 loads only here: a restore that needs S3

    config = store_s3.S3Config.from_env()
    if config is None:
        if missing is not None:
            raise missing  # the local store's own words (no S3 tier configured)
        assert local is not None
        return local
    try:
        return store_s3.S3Tier(config).download(store, key, number)
    except (store_layout.NotFound, store_s3.S3Error):
        if local is None:
            raise
        return local


def _sweep(links: str) -> None:
    try:
        entries = list(os.scandir(links))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if time.time() - entry.stat(follow_symlinks=False).st_mtime > LINK_DIR_MAX_AGE_S:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass
