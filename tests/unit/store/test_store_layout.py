"""The store's on-disk layout: atomic generations, manifests written last, hostile keys, verification."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kybernate.hooks.api import store as sl

IDENT = sl.Identity(container_id="c1", container_name="counter", namespace="k8s.io")


def write_generation(store: sl.Store, key: str, files: dict[str, bytes]) -> sl.Generation:
    pending = store.begin(key)
    for name, data in files.items():
        path = Path(pending.temp, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return pending.commit(IDENT, gpu={"processes": 1})


def test_a_generation_is_renamed_into_place_with_a_manifest_listing_every_file(tmp_path: Path) -> None:
    store = sl.Store(str(tmp_path))
    gen = write_generation(store, "web", {"checkpoint/pages-1.img": b"x" * 5000, "spec.dump": b"{}"})
    assert gen.number == 1 and gen.path == str(tmp_path / "web" / "1")
    data = json.loads((tmp_path / "web" / "1" / "manifest.json").read_text())
    assert data["key"] == "web" and data["generation"] == 1 and data["node"]
    assert data["identity"]["container_id"] == "c1" and data["gpu"] == {"processes": 1}
    assert data["creator"] == "kybernate" and data["creator_version"]
    assert {f["path"]: f["size"] for f in data["files"]} == {"checkpoint/pages-1.img": 5000, "spec.dump": 2}
    assert data["size"] == 5002
    assert os.listdir(tmp_path / "web") == ["1"]  # no temp dir left
    second = write_generation(store, "web", {"a": b"1"})
    assert second.number == 2 and store.generations("web") == [1, 2]
    assert store.open("web").number == 2 and store.open("web", 1).manifest.size == 5002
    store.verify(store.open("web", 1))


def test_an_uncommitted_or_aborted_generation_never_looks_complete(tmp_path: Path) -> None:
    store = sl.Store(str(tmp_path))
    pending = store.begin("job")
    Path(pending.temp, "inventory.img").write_bytes(b"data")
    assert store.generations("job") == []  # a crash here leaves only a dot-dir without number
    with pytest.raises(sl.NotFound, match="no complete checkpoint for key 'job'"):
        store.open("job")
    pending.abort()
    assert os.listdir(tmp_path / "job") == []
    # A numbered dir without manifest (a torn copy) is neither listed nor reused.
    (tmp_path / "job" / "1").mkdir()
    assert store.generations("job") == []
    assert write_generation(store, "job", {"a": b"1"}).number == 2


@pytest.mark.parametrize("key, says", [
    ("a/b", "path separator"), ("a\\b", "path separator"), ("..", "'..'"), ("a..b", "'..'"),
    ("a\nb", "control"), ("a\x00b", "control"), ("x" * 129, "129 characters"), ("", "empty"),
    (".hidden", "starts with '.'"), ("a b", "letters, digits"), ("ключ", "letters, digits"), ("a@1", "'@'"),
])
def test_hostile_keys_are_refused_and_nothing_is_created(tmp_path: Path, key: str, says: str) -> None:
    store = sl.Store(str(tmp_path / "store"))
    with pytest.raises(sl.BadKey, match=says):
        store.begin(key)
    assert not (tmp_path / "store").exists()


def test_references_name_a_key_and_maybe_a_generation() -> None:
    assert sl.parse_reference("web") == ("web", None)
    assert sl.parse_reference("web@12") == ("web", 12)
    for bad in ("web@", "web@0", "web@x", "web@-1", "../x@1"):
        with pytest.raises(sl.BadKey):
            sl.parse_reference(bad)


def test_verification_names_the_changed_file(tmp_path: Path) -> None:
    store = sl.Store(str(tmp_path))
    gen = write_generation(store, "k", {"checkpoint/pages-1.img": b"a" * 100, "rootfs-diff.tar": b"b" * 10})
    target = Path(gen.path, "checkpoint", "pages-1.img")
    target.write_bytes(b"a" * 99 + b"c")  # same size, other content
    with pytest.raises(sl.Corrupt, match="pages-1.img: sha256 does not match") as err:
        store.verify(store.open("k"))
    assert err.value.path == str(target)
    target.write_bytes(b"a")
    with pytest.raises(sl.Corrupt, match="size 1 does not match"):
        store.verify(store.open("k"))
    target.unlink()
    with pytest.raises(sl.Corrupt, match="cannot be read"):
        store.verify(store.open("k"))


def test_a_manifest_with_hostile_paths_is_refused(tmp_path: Path) -> None:
    store = sl.Store(str(tmp_path))
    gen = write_generation(store, "k", {"a": b"1"})
    path = Path(gen.path, "manifest.json")
    data = json.loads(path.read_text())
    data["files"][0]["path"] = "../../etc/passwd"
    path.write_text(json.dumps(data))
    with pytest.raises(sl.Corrupt, match="not a plain relative path"):
        store.open("k")
    data["files"][0]["path"] = "a"
    data["generation"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(sl.Corrupt, match="names 'k'@7"):
        store.open("k")


def test_a_full_disk_is_reported_as_such_and_the_temp_dir_removed(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    os.system(f"mount -t tmpfs -o size=256k tmpfs {mnt}")
    try:
        store = sl.Store(str(mnt))
        pending = store.begin("k")
        with pytest.raises(OSError):
            Path(pending.temp, "big").write_bytes(b"x" * (1 << 20))
        assert pending.is_full()
        pending.abort()
        assert os.listdir(mnt / "k") == []
        # The manifest itself cannot be written: commit removes the temp dir and says the store is full.
        pending = store.begin("k")
        try:
            with open(Path(pending.temp, "fill"), "wb") as f:
                while True:
                    f.write(b"y" * 4096)
                    f.flush()
        except OSError:
            pass
        with pytest.raises(sl.StoreFull, match="is full"):
            pending.commit(IDENT)
        assert os.listdir(mnt / "k") == []
    finally:
        os.system(f"umount {mnt}")


def test_stale_temp_dirs_are_swept(tmp_path: Path) -> None:
    store = sl.Store(str(tmp_path))
    write_generation(store, "k", {"a": b"1"})
    pending = store.begin("k")
    os.utime(pending.temp, (0, 0))
    assert store.remove_stale_temps() == [pending.temp]
    assert os.listdir(tmp_path / "k") == ["1"]


def test_large_files_are_hashed_in_parts_and_a_changed_part_is_found(tmp_path: Path) -> None:
    import hashlib

    data = bytes(range(256)) * 4096 * 3  # 3 MiB
    entries = sl.hash_files(str(tmp_path), [], part_size=1 << 20)
    assert entries == []
    Path(tmp_path, "big").write_bytes(data)
    Path(tmp_path, "small").write_bytes(b"abc")
    big, small = sl.hash_files(str(tmp_path), ["big", "small"], part_size=1 << 20)
    assert small.sha256 == hashlib.sha256(b"abc").hexdigest() and small.parts == ()
    parts = [hashlib.sha256(data[i:i + (1 << 20)]).hexdigest() for i in range(0, len(data), 1 << 20)]
    assert big.parts == tuple(parts)
    assert big.sha256 == hashlib.sha256(b"".join(bytes.fromhex(p) for p in parts)).hexdigest()
    sl.verify_files(str(tmp_path), [big, small])
    # The manifest round-trips the parts.
    m = sl.Manifest("k", 1, "now", "node", IDENT, (big, small))
    assert sl.Manifest.from_json(m.to_json(), "here").files == (big, small)
    changed = bytearray(data)
    changed[(2 << 20) + 5] ^= 1
    Path(tmp_path, "big").write_bytes(changed)
    with pytest.raises(sl.Corrupt, match="big: sha256 does not match"):
        sl.verify_files(str(tmp_path), [big, small])
    Path(tmp_path, "big").write_bytes(b"")
    empty = sl.hash_files(str(tmp_path), ["big"])[0]
    assert empty.sha256 == hashlib.sha256(b"").hexdigest()
    sl.verify_files(str(tmp_path), [empty])


def test_parts_hashed_while_a_file_grows_give_the_same_manifest(tmp_path: Path) -> None:
    import threading

    part = 1 << 20
    data = os.urandom(5 * part + 123)
    target = Path(tmp_path, "checkpoint")
    target.mkdir()
    with sl.PartHasher(str(tmp_path), part_size=part) as hasher, open(target / "pages-1.img", "wb") as f:
        for i in range(0, len(data), part // 2):
            f.write(data[i:i + part // 2])
            f.flush()
        # Wait (on the hasher's own state) until it has caught up with the full parts.
        while len(hasher.known.get("checkpoint/pages-1.img", {})) < 5:
            threading.Event().wait(0.01)
    known = hasher.known
    assert sorted(known["checkpoint/pages-1.img"]) == [i * part for i in range(5)]
    with_known = sl.hash_files(str(tmp_path), ["checkpoint/pages-1.img"], part_size=part, known=known)
    plain = sl.hash_files(str(tmp_path), ["checkpoint/pages-1.img"], part_size=part)
    assert with_known == plain
    # A wrong pre-hashed part (a file rewritten behind the hasher's back) is caught by verification.
    known["checkpoint/pages-1.img"][0] = "0" * 64
    wrong = sl.hash_files(str(tmp_path), ["checkpoint/pages-1.img"], part_size=part, known=known)
    with pytest.raises(sl.Corrupt, match="pages-1.img: sha256 does not match"):
        sl.verify_files(str(tmp_path), wrong)
