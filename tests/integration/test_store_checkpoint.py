"""`kybernate checkpoint <container>` into the store (containerd 1.6.20 and 2.1.x), through a real
kybernate-hookd (its Store.Checkpoint): our shim dumps straight into `<store>/<key>/<generation>/`
(containerd 1.6 would not pass an image path to a runtime not named io.containerd.runc*), with the
manifest last; faults leave the container running and no temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RUNTIME
from harness.containerd import Containerd, CtrError
from harness.gpunode import GpuNode
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, read_counts, task_status, wait_for

from kybernate.hooks.api import store as store_layout

pytestmark = pytest.mark.stack


@pytest.fixture(autouse=True)
def private_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The store's SQLite index for the `kybernate` commands of this test (never the node's)."""
    path = tmp_path / "registry.db"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(path))
    return path
COMMAND = "echo hi > /made; rm /etc/group; " + COUNTER


def kybernate(c: Containerd, hookd: GpuNode, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", *args, "--socket", hookd.socket,
         "--namespace", c.namespace],
        capture_output=True, text=True, timeout=120,
    )


def counts_so_far(c: Containerd, name: str) -> list[int]:
    """The counter's numbers, [] before it has written its first (`cat` of a file not there yet)."""
    try:
        return read_counts(c, name)
    except CtrError:
        return []


def start_counter(c: Containerd, name: str) -> int:
    c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_IMAGE, name, "sh", "-c", COMMAND)
    return wait_for("the counter", lambda: (n := counts_so_far(c, name)) and len(n) > 3 and n)[-1]


def test_checkpoint_into_the_store_leaving_the_container_running(kyb: Containerd, tmp_path: Path,
                                                                 private_registry: Path, store_hookd) -> None:
    store = tmp_path / "store"
    hookd = store_hookd(kyb, store, "--store-keep", "2", registry=private_registry)
    start_counter(kyb, "cnt")
    done = kybernate(kyb, hookd, "checkpoint", "cnt", "--key", "web", "--leave-running", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["key"], result["generation"], result["path"]) == ("web", 1, str(store / "web" / "1"))
    assert {"pause", "dump", "rootfs", "resume", "manifest"} <= result["phases"].keys()
    assert 0 < result["pause_s"] < result["seconds"] and result["upload_queued"] is False
    # One line per phase on stderr when it is not a terminal (here a pipe).
    phases = [line.split(":")[0] for line in done.stderr.splitlines()]
    assert ["pause", "dump", "rootfs", "resume", "manifest"] == [p for p in phases if p in result["phases"]]

    gen = store_layout.Store(str(store)).open("web")
    store_layout.Store(str(store)).verify(gen)
    names = {f.path for f in gen.manifest.files}
    assert {"checkpoint/inventory.img", "rootfs-diff.tar", "deleted.files", "config.dump", "spec.dump"} <= names
    assert any(n.startswith("checkpoint/pages-") for n in names)
    assert gen.manifest.identity.container_id == "cnt" and gen.manifest.identity.runtime == RUNTIME
    assert json.loads((store / "web" / "1" / "deleted.files").read_text()) == ["/etc/group"]
    assert os.listdir(store / "web") == ["1"]  # no temp dir left
    # Nothing went through containerd's content store.
    assert "criu" not in kyb.ctr("content", "ls").stdout

    assert task_status(kyb, "cnt") == "RUNNING"
    last = read_counts(kyb, "cnt")[-1]
    wait_for("the counter to move on", lambda: read_counts(kyb, "cnt")[-1] > last + 1)

    # A second checkpoint is generation 2 of the same key; without --leave-running the task exits.
    done = kybernate(kyb, hookd, "checkpoint", "cnt", "--key", "web")
    assert done.returncode == 0, done.stderr
    assert store_layout.Store(str(store)).generations("web") == [1, 2]
    wait_for("the checkpointed task to stop", lambda: task_status(kyb, "cnt") == "STOPPED")

    # The registry lists both; wiped and rebuilt from the manifests, it lists the same.
    def ls(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "ls", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = json.loads(ls("--json"))
    assert [(r["key"], r["generation"], r["state"], r["tiers"]) for r in listed] == [
        ("web", 1, "complete", ["local"]), ("web", 2, "complete", ["local"])]
    assert listed[0]["container"] == "cnt" and listed[0]["size"] == result["size"]
    table = ls().splitlines()
    assert table[0].split() == ["KEY", "GEN", "STATE", "TIERS", "SIZE", "CREATED", "NODE", "GPU"]
    assert [line.split()[:4] for line in table[1:]] == [["web", "1", "complete", "local"],
                                                        ["web", "2", "complete", "local"]]
    private_registry.unlink()
    assert json.loads(ls("--json")) == []
    done = subprocess.run([sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "store", "rebuild",
                           "--store", str(store)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "2 generations indexed" in done.stderr, done.stderr

    def stable(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "last_used"} for r in rows]

    assert stable(json.loads(ls("--json"))) == stable(listed)

    # Retention: with hookd's --store-keep 2 a third checkpoint removes generation 1.
    start_counter(kyb, "cnt2")
    done = kybernate(kyb, hookd, "checkpoint", "cnt2", "--key", "web", "--leave-running")
    assert done.returncode == 0, done.stderr
    assert store_layout.Store(str(store)).generations("web") == [2, 3]
    assert [r["generation"] for r in json.loads(ls("--json"))] == [2, 3]


def test_a_full_store_fails_the_checkpoint_and_the_container_runs_on(kyb: Containerd, tmp_path: Path,
                                                                     store_hookd) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(small)], check=True)
    try:
        hookd = store_hookd(kyb, small)
        start_counter(kyb, "full")
        done = kybernate(kyb, hookd, "checkpoint", "full", "--key", "web", "--leave-running")
        assert done.returncode == 1, done.stderr
        assert "is full" in done.stderr and "partial checkpoint was removed" in done.stderr, done.stderr
        assert "[RESOURCE_EXHAUSTED]" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert os.listdir(small / "web") == []
        assert task_status(kyb, "full") == "RUNNING"
        last = read_counts(kyb, "full")[-1]
        wait_for("the counter to move on", lambda: read_counts(kyb, "full")[-1] > last + 1)
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_bad_input_is_refused_before_anything_is_touched(kyb: Containerd, tmp_path: Path, store_hookd) -> None:
    store = tmp_path / "store"
    hookd = store_hookd(kyb, store)
    start_counter(kyb, "bad")
    for key, says in (("../x", "path separator"), ("a\tb", "control"), ("x" * 200, "at most 128")):
        done = kybernate(kyb, hookd, "checkpoint", "bad", "--key", key)
        assert done.returncode == 1 and says in done.stderr, done.stderr
    done = kybernate(kyb, hookd, "checkpoint", "nope", "--key", "k")
    assert done.returncode == 1 and "'nope' not found" in done.stderr and "[NOT_FOUND]" in done.stderr, done.stderr
    assert not store.exists() or os.listdir(store) == []
    # No key: the container's default key (hooks/api/checkpoint_key.py), <namespace>_<id> for a ctr container.
    done = kybernate(kyb, hookd, "checkpoint", "bad", "--leave-running")
    assert done.returncode == 0 and f"stored {kyb.namespace}_bad@1" in done.stderr, done.stderr
    assert task_status(kyb, "bad") == "RUNNING"
    # hookd not running: the command says where it looked and what to start.
    hookd.stop_hookd_gracefully()
    done = kybernate(kyb, hookd, "checkpoint", "bad", "--key", "k")
    assert done.returncode == 1 and f"kybernate-hookd is not running at {hookd.socket}" in done.stderr, done.stderr
    assert "start kybernate-hookd" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert task_status(kyb, "bad") == "RUNNING"


def test_without_a_key_the_checkpoint_goes_under_the_containers_own_key(kyb: Containerd, tmp_path: Path,
                                                                      store_hookd) -> None:
    """No --key: hookd takes the container's kybernate.io/checkpoint-key, else its default key, the one
    checkpoint-on-stop and resume: latest use (hooks/api/checkpoint_key.py)."""
    store = tmp_path / "store"
    hookd = store_hookd(kyb, store)
    start_counter(kyb, "own")
    done = kybernate(kyb, hookd, "checkpoint", "own", "--leave-running", "--json")
    assert done.returncode == 0, done.stderr
    key = json.loads(done.stdout)["key"]
    assert key == f"{kyb.namespace}_own"
    assert store_layout.Store(str(store)).generations(key) == [1]
    assert task_status(kyb, "own") == "RUNNING"


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_ctr_users_restore_and_export_a_generation(kyb_factory, tmp_path: Path, store_hookd, stack,
                                                   version: str) -> None:
    store = tmp_path / "store"
    c = kyb_factory(version, env={"KYBERNATE_STORE": str(store)})  # the shims restore from this store
    hookd = store_hookd(c, store)
    before = start_counter(c, "cnt")
    done = kybernate(c, hookd, "checkpoint", "cnt", "--key", "web")  # the task exits after the dump
    assert done.returncode == 0, done.stderr
    wait_for("the checkpointed task to stop", lambda: task_status(c, "cnt") == "STOPPED")

    # `kybernate restore` for ctr users: a new container under our runtime, restored by the shim's Create.
    done = subprocess.run(
        [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "restore", "web", "--id", "cnt-r",
         "--address", str(c.address), "--namespace", c.namespace, "--ctr", str(c.binaries.ctr),
         "--store", str(store)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "restored web@1 as cnt-r" in done.stderr, done.stderr
    assert task_status(c, "cnt-r") == "RUNNING"
    now = read_counts(c, "cnt-r")
    assert now[-1] >= before, now  # carried on from the checkpoint, not started afresh
    wait_for("the restored counter to move on", lambda: read_counts(c, "cnt-r")[-1] > now[-1])
    assert c.ctr("tasks", "exec", "--exec-id", "made", "cnt-r", "cat", "/made").stdout == "hi\n"
    assert c.ctr("tasks", "exec", "--exec-id", "gone", "cnt-r", "ls", "/etc/group", check=False).returncode != 0
    # A bad reference changes nothing.
    done = subprocess.run(
        [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "restore", "web@9", "--id", "x",
         "--address", str(c.address), "--namespace", c.namespace, "--store", str(store)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr

    # The generation as a CRI-style archive that checkpointctl reads.
    archive = tmp_path / "web.tar"
    done = subprocess.run([sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "store", "export", "web",
                           "-o", str(archive), "--store", str(store)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    shown = subprocess.run([str(stack.checkpointctl), "show", str(archive)], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0, shown.stderr
    for expected in ("cnt", BUSYBOX_IMAGE):
        assert expected in shown.stdout, shown.stdout
