import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from kybernate.shim import restore_from
from kybernate.shim.restore_from import RestoreError, RestorePlan


def _tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "busybox").write_text("the real binary")
    os.symlink("busybox", root / "bin" / "true")
    (root / "etc").mkdir()
    (root / "etc" / "group").write_text("root:x:0:")
    (root / "data").mkdir()
    (root / "data" / "old").write_text("old")
    return root


def _plan(tmp_path: Path, diff: Path | None, deleted: tuple[str, ...] = ()) -> RestorePlan:
    return RestorePlan(str(tmp_path / "a.tar"), str(tmp_path / "checkpoint"), str(diff) if diff else None, deleted)


def test_whiteouts_delete_and_opaque_dirs_are_emptied_then_changes_land(tmp_path: Path, rootfs: Path) -> None:
    diff = _tar(tmp_path / "diff.tar", {"etc/.wh.group": b"", "data/.wh..wh..opq": b"", "data/new": b"new",
                                       "made": b"hi"})
    restore_from.apply_rootfs(_plan(tmp_path, diff), str(rootfs))
    assert not (rootfs / "etc" / "group").exists()
    assert sorted(p.name for p in (rootfs / "data").iterdir()) == ["new"]
    assert (rootfs / "made").read_text() == "hi"
    assert not list(rootfs.rglob(".wh.*"))


def test_deleting_a_symlink_removes_the_link_not_its_target(tmp_path: Path, rootfs: Path) -> None:
    restore_from.apply_rootfs(_plan(tmp_path, None, ("/bin/true",)), str(rootfs))
    assert not os.path.lexists(rootfs / "bin" / "true")
    assert (rootfs / "bin" / "busybox").read_text() == "the real binary"


@pytest.mark.parametrize("name", ["../outside", "/../../etc/passwd", "etc/../../x"])
def test_deletions_outside_the_rootfs_are_refused(tmp_path: Path, rootfs: Path, name: str) -> None:
    (tmp_path / "outside").write_text("keep")
    with pytest.raises(RestoreError, match="outside the container's rootfs"):
        restore_from.apply_rootfs(_plan(tmp_path, None, (name,)), str(rootfs))
    assert (tmp_path / "outside").read_text() == "keep"


def test_a_diff_with_a_link_out_of_the_tree_is_refused(tmp_path: Path, rootfs: Path) -> None:
    diff = _tar(tmp_path / "diff.tar", {}, links={"escape": "/etc/shadow"})
    with pytest.raises(RestoreError, match="cannot apply the rootfs changes"):
        restore_from.apply_rootfs(_plan(tmp_path, diff), str(rootfs))


def test_references_must_stay_inside_the_checkpoint_dir(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "ok.tar").write_bytes(b"x")
    (tmp_path / "secret.tar").write_bytes(b"x")
    os.symlink(tmp_path / "secret.tar", store / "link.tar")
    assert restore_from.resolve("ok.tar", str(store)) == str(store / "ok.tar")
    for bad in ("../secret.tar", str(tmp_path / "secret.tar"), "link.tar", "."):
        with pytest.raises(RestoreError, match="outside the checkpoint directory"):
            restore_from.resolve(bad, str(store))
    with pytest.raises(RestoreError, match="no checkpoint archive"):
        restore_from.resolve("missing.tar", str(store))


def test_the_sandbox_is_never_restored_and_empty_references_are_refused() -> None:
    assert restore_from.requested({"annotations": {restore_from.ANNOTATION: "a.tar",
                                                   restore_from.CONTAINER_TYPE: "sandbox"}}) is None
    assert restore_from.requested({}) is None
    with pytest.raises(RestoreError, match="is empty"):
        restore_from.requested({"annotations": {restore_from.ANNOTATION: " "}})


def test_unpack_takes_what_a_restore_needs_and_reads_deleted_files(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar", {"checkpoint/inventory.img": b"i", "rootfs-diff.tar": b"",
                                       "deleted.files": json.dumps(["/etc/group"]).encode(), "other": b"x"})
    plan = restore_from.unpack(str(archive), str(tmp_path / "work"))
    assert plan.deleted_files == ("/etc/group",)
    assert Path(plan.checkpoint_dir, "inventory.img").exists()
    assert not (tmp_path / "work" / "other").exists()
