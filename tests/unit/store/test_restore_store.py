"""The shim's side of `kybernate.io/restore-from: store:...`: verify, then hard-link into a plan."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kybernate.hooks.api import store as sl
from kybernate.shim import restore_store
from kybernate.shim.restore_from import RestoreError

IDENT = sl.Identity(container_id="c1")


def generation(root: Path, key: str = "web", deleted: list[str] | None = None) -> sl.Generation:
    pending = sl.Store(str(root)).begin(key)
    Path(pending.temp, "checkpoint").mkdir()
    Path(pending.temp, "checkpoint", "inventory.img").write_bytes(b"inv")
    Path(pending.temp, "checkpoint", "pages-1.img").write_bytes(b"p" * 1000)
    Path(pending.temp, "rootfs-diff.tar").write_bytes(b"tar")
    if deleted is not None:
        Path(pending.temp, "deleted.files").write_text(json.dumps(deleted))
    return pending.commit(IDENT)


def test_the_newest_generation_is_verified_and_hard_linked(tmp_path: Path) -> None:
    generation(tmp_path)
    second = generation(tmp_path, deleted=["/etc/group"])
    plan = restore_store.prepare("store:web", "cid", str(tmp_path))
    assert plan.archive == "store:web@2" and plan.deleted_files == ("/etc/group",)
    assert Path(plan.checkpoint_dir).parent.parent == tmp_path / ".restore"
    linked = Path(plan.checkpoint_dir, "pages-1.img")
    assert not linked.is_symlink() and linked.stat().st_ino == Path(second.path, "checkpoint/pages-1.img").stat().st_ino
    assert plan.rootfs_diff is not None and Path(plan.rootfs_diff).read_bytes() == b"tar"
    older = restore_store.prepare("store:web@1", "cid", str(tmp_path))
    assert older.archive == "store:web@1" and older.deleted_files == ()
    assert sl.Store(str(tmp_path)).keys() == ["web"]  # link dirs are not keys


def test_a_damaged_file_is_refused_naming_it_and_nothing_is_prepared(tmp_path: Path) -> None:
    gen = generation(tmp_path)
    pages = Path(gen.path, "checkpoint", "pages-1.img")
    pages.write_bytes(b"q" + b"p" * 999)
    with pytest.raises(RestoreError, match=f"store:web: refused, the checkpoint is damaged: {pages}: sha256"):
        restore_store.prepare("store:web", "cid", str(tmp_path))
    assert not (tmp_path / ".restore").exists() or os.listdir(tmp_path / ".restore") == []


@pytest.mark.parametrize("reference, says", [
    ("store:", "empty"), ("store:a/b", "path separator"), ("store:web@0", "not a positive number"),
    ("store:web", "no complete checkpoint for key 'web'"),
])
def test_bad_references_are_refused(tmp_path: Path, reference: str, says: str) -> None:
    with pytest.raises(RestoreError, match=says):
        restore_store.prepare(reference, "cid", str(tmp_path))


def test_stale_link_dirs_are_swept(tmp_path: Path) -> None:
    generation(tmp_path)
    old = restore_store.prepare("store:web", "old", str(tmp_path))
    os.utime(Path(old.checkpoint_dir).parent, (0, 0))
    restore_store.prepare("store:web", "new", str(tmp_path))
    assert [p.name.split("-")[0] for p in (tmp_path / ".restore").iterdir()] == ["new"]
