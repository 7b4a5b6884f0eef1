"""`kybernate checkpoint` on containerd 1.6 (no CRI checkpoint there): the archive it writes restores into
a new pod through `kybernate.io/restore-from`, with memory and file changes (made and deleted files)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from harness.containerd import CRI_NAMESPACE, Containerd
from harness.cri import pb
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, wait_for

pytestmark = pytest.mark.stack
ANNOTATION = "kybernate.io/restore-from"
# The container makes one file and deletes one of its image before counting. (A regular file: restore_from
# resolves a deleted path through symlinks, so deleting the /bin/true applet link would remove busybox.)
COMMAND = "echo hi > /made; rm /etc/group; " + COUNTER


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    d = tmp_path / "checkpoints"
    d.mkdir()
    return d


def runtime_toml(checkpoints: Path) -> str:
    return f'[kybernate]\ncheckpoint_dir = "{checkpoints}"\n'


def counts(cri, cid: str) -> list[int]:
    return [int(x) for x in cri.exec_sync(cid, ["cat", "/count"]).stdout.split()]


def kybernate_checkpoint(c: Containerd, container_id: str, output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "checkpoint", "--address", str(c.address),
         "--namespace", CRI_NAMESPACE, container_id, "--output", str(output)],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_an_archive_written_by_kybernate_checkpoint_restores_into_a_new_pod(
        kyb_factory, checkpoints: Path, version: str) -> None:
    # 1.6 is what the command is for (no CRI checkpoint there); 2.1 shows it is not tied to one version.
    c = kyb_factory(version, runtime_toml=runtime_toml(checkpoints))
    archive = checkpoints / "counter.tar"
    with c.cri() as cri:
        config = cri.pod_config("a")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COMMAND])
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 15)
        before = counts(cri, cid)[-1]

        done = kybernate_checkpoint(c, cid, archive)
        assert done.returncode == 0, done.stderr
        assert "paused" in done.stderr and "resumed" in done.stderr and "wrote" in done.stderr, done.stderr
        # Nothing of ours stays in containerd: the parent's view is removed, the lease dropped.
        assert "kybernate-checkpoint" not in c.ctr("snapshots", "ls", namespace=CRI_NAMESPACE).stdout
        assert "kybernate-checkpoint" not in c.ctr("leases", "ls", namespace=CRI_NAMESPACE).stdout
        last = counts(cri, cid)[-1]
        # Pod A runs on: still running, still counting.
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
        wait_for("pod A's counter to move on", lambda: counts(cri, cid)[-1] > last + 1)
        cri.stop_pod(pod)
        cri.remove_pod(pod)

    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert {"checkpoint/inventory.img", "rootfs-diff.tar", "config.dump", "spec.dump", "deleted.files"} <= names
        config_dump = json.load(tar.extractfile("config.dump"))
        assert config_dump["id"] == cid and config_dump["name"].startswith("counter_")
        assert {"rootfsImageName", "runtime", "createdTime", "checkpointedTime"} <= config_dump.keys()
        assert json.load(tar.extractfile("spec.dump"))["process"]["args"][-1] == COMMAND
        assert "/etc/group" in json.load(tar.extractfile("deleted.files"))
    assert not [p.name for p in checkpoints.iterdir() if p.name != "counter.tar"]  # no temp files left

    with c.cri() as cri:
        config = cri.pod_config("b", annotations={ANNOTATION: "counter.tar"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COMMAND])
        cri.start_container(cid)
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
        # Read at once: a fresh start would show a handful of lines, a restore at least A's.
        assert counts(cri, cid)[-1] >= before
        restored = wait_for("the restored counter to move on",
                            lambda: (n := counts(cri, cid)) and n[-1] > before + 1 and n)
        assert restored == list(range(len(restored)))
        assert cri.exec_sync(cid, ["cat", "/made"]).stdout.strip() == b"hi"
        assert cri.exec_sync(cid, ["ls", "/etc/group"]).exit_code != 0
        assert cri.exec_sync(cid, ["ls", "/etc/passwd"]).exit_code == 0


def test_an_unknown_container_fails_clearly(kyb_factory, checkpoints: Path) -> None:
    c = kyb_factory("1.6", runtime_toml=runtime_toml(checkpoints))
    done = kybernate_checkpoint(c, "no-such-container", checkpoints / "x.tar")
    assert done.returncode != 0
    assert "container 'no-such-container' not found" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert list(checkpoints.iterdir()) == []


def test_a_failed_checkpoint_leaves_the_container_running(kyb_factory, checkpoints: Path) -> None:
    # A container that counts as a GPU container while kybernate-hookd is not there: the pause works
    # (it keeps VRAM), the checkpoint fails in our shim before CRIU runs.
    toml = runtime_toml(checkpoints) + f'hookd_socket = "{checkpoints.parent}/no-hookd.sock"\npause_releases_vram = false\n'
    c = kyb_factory("1.6", runtime_toml=toml)
    with c.cri() as cri:
        config = cri.pod_config("a", annotations={"kybernate.io/gpu": "true"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER])
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 3)
        done = kybernate_checkpoint(c, cid, checkpoints / "gpu.tar")
        assert done.returncode != 0, done.stderr
        assert "checkpoint of container" in done.stderr and "it runs on" in done.stderr, done.stderr
        assert "resumed" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert list(checkpoints.iterdir()) == []
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
        last = counts(cri, cid)[-1]
        wait_for("the counter to move on", lambda: counts(cri, cid)[-1] > last + 1)

        # A container that is not running is refused before anything is touched.
        cri.stop_container(cid)
        done = kybernate_checkpoint(c, cid, checkpoints / "stopped.tar")
        assert done.returncode != 0
        assert "is not running" in done.stderr or "only running containers" in done.stderr, done.stderr
