"""Restore from the store into a new pod: `kybernate.io/restore-from: store:<key>` (newest generation) or
`store:<key>@<generation>`, on containerd 1.6.20 and 2.1.x; a damaged file is refused, naming it, and
nothing starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from harness.containerd import CRI_NAMESPACE, Containerd
from harness.cri import pb
from harness.gpunode import GpuNode
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, wait_for

from kybernate.hooks.api import store as store_layout

pytestmark = pytest.mark.stack


@pytest.fixture(autouse=True)
def private_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The store's SQLite index for the `kybernate` commands of this test (never the node's)."""
    path = tmp_path / "registry.db"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(path))
    return path
ANNOTATION = "kybernate.io/restore-from"
COMMAND = "echo hi > /made; rm /etc/group; " + COUNTER


def counts(cri, cid: str) -> list[int]:
    return [int(x) for x in cri.exec_sync(cid, ["cat", "/count"]).stdout.split()]


def checkpoint(hookd: GpuNode, cid: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`kybernate checkpoint` through the test's hookd (which owns the store)."""
    return subprocess.run(
        [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "checkpoint", cid, "--socket", hookd.socket,
         "--namespace", CRI_NAMESPACE, *extra],
        capture_output=True, text=True, timeout=120,
    )


def start_pod(cri, name: str, annotations: dict[str, str] | None = None) -> tuple[str, str]:
    config = cri.pod_config(name, annotations=annotations or {})
    pod = cri.run_pod(config, runtime_handler="kybernate")
    cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COMMAND])
    return pod, cid


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_a_new_pod_restores_from_the_store(kyb_factory, tmp_path: Path, version: str, store_hookd) -> None:
    store = tmp_path / "store"
    c = kyb_factory(version, env={"KYBERNATE_STORE": str(store)})
    hookd = store_hookd(c, store)
    with c.cri() as cri:
        pod, cid = start_pod(cri, "a")
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 10)
        done = checkpoint(hookd, cid, "--key", "web", "--leave-running")
        assert done.returncode == 0, done.stderr
        first = counts(cri, cid)[-1]
        wait_for("pod A to count on", lambda: counts(cri, cid)[-1] > first + 5)
        done = checkpoint(hookd, cid, "--key", "web")  # generation 2, and pod A's container exits
        assert done.returncode == 0, done.stderr
        wait_for("pod A's container to exit", lambda: cri.container_status(cid).state == pb.CONTAINER_EXITED)
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    gen2 = store_layout.Store(str(store)).open("web", 2)

    with c.cri() as cri:
        # The newest generation: the counter goes on from where generation 2 left it.
        pod, cid = start_pod(cri, "b", {ANNOTATION: "store:web"})
        cri.start_container(cid)
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
        now = counts(cri, cid)
        assert now[-1] > first + 5, now  # restored, not started afresh (a fresh start has a handful)
        restored = wait_for("the restored counter to move on",
                            lambda: (n := counts(cri, cid)) and n[-1] > now[-1] + 1 and n)
        assert restored == list(range(len(restored)))
        assert cri.exec_sync(cid, ["cat", "/made"]).stdout.strip() == b"hi"
        assert cri.exec_sync(cid, ["ls", "/etc/group"]).exit_code != 0
        cri.stop_pod(pod)
        cri.remove_pod(pod)

        # An older generation by number.
        pod, cid = start_pod(cri, "c", {ANNOTATION: "store:web@1"})
        cri.start_container(cid)
        older = counts(cri, cid)
        # Generation 1 was taken after at least 10 counts and before `first` was read.
        assert 10 <= older[-1] < now[-1] and older == list(range(len(older))), older
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    # The generations are untouched by the restores.
    store_layout.Store(str(store)).verify(gen2)
    assert sorted(p.name for p in (store / "web" / "2").iterdir()) == sorted(
        {f.path.split("/")[0] for f in gen2.manifest.files} | {"manifest.json"})


def test_a_damaged_or_missing_checkpoint_is_refused_and_nothing_starts(kyb_factory, tmp_path: Path,
                                                                      store_hookd) -> None:
    store = tmp_path / "store"
    c = kyb_factory("1.6", env={"KYBERNATE_STORE": str(store)})
    hookd = store_hookd(c, store)
    with c.cri() as cri:
        pod, cid = start_pod(cri, "a")
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 3)
        done = checkpoint(hookd, cid, "--key", "web", "--leave-running")
        assert done.returncode == 0, done.stderr
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    pages = sorted((store / "web" / "1" / "checkpoint").glob("pages-*.img"))[0]
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages.write_bytes(bytes(data))

    with c.cri() as cri:
        for reference, says in (("store:web", f"{pages}: sha256 does not match"),
                                ("store:web@7", "no complete generation 7"),
                                ("store:nokey", "no complete checkpoint for key 'nokey'"),
                                ("store:../etc", "path separator")):
            config = cri.pod_config("b", annotations={ANNOTATION: reference})
            pod = cri.run_pod(config, runtime_handler="kybernate")
            cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COMMAND])
            # Our shim's Create runs at CRI StartContainer: that is where the restore is refused.
            with pytest.raises(grpc.RpcError) as err:
                cri.start_container(cid)
            assert says in str(err.value), str(err.value)
            assert cri.container_status(cid).state != pb.CONTAINER_RUNNING
            assert list((store / ".restore").glob("*")) == []  # nothing prepared for a refused restore
            cri.stop_pod(pod)
            cri.remove_pod(pod)
