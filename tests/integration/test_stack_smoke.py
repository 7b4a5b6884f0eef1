"""The provisioned stack works on its own, stock runc runtime, before Kybernate is put in front of it.

If these fail, every Kybernate integration test would fail for reasons that are not Kybernate's.
"""

from __future__ import annotations

import ipaddress
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.containerd import Containerd
from harness.cri import pb
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, read_counts, wait_for
from harness.stack import Stack

pytestmark = pytest.mark.stack


def test_counter_survives_checkpoint_delete_and_live_restore(containerd: Containerd) -> None:
    c, name, ref = containerd, "counter", "kyb.local/checkpoint/counter:1"
    c.ctr("run", "-d", BUSYBOX_IMAGE, name, "sh", "-c", COUNTER)
    wait_for("the counter to reach 5", lambda: len(read_counts(c, name)) > 5 or None)

    before = read_counts(c, name)[-1]
    c.ctr("containers", "checkpoint", "--task", "--rw", name, ref, timeout=60)
    c.ctr("tasks", "rm", "-f", name)  # -f: kill the still running task first
    c.ctr("containers", "rm", name)
    assert name not in c.ctr("containers", "ls", "-q").stdout.split()

    c.ctr("containers", "restore", "--live", "--rw", name, ref, timeout=60)
    assert "RUNNING" in c.ctr("tasks", "ls").stdout
    # Read at once: a counter started afresh would still be near 0 here.
    assert read_counts(c, name)[-1] >= before

    def moved_on() -> list[int] | None:
        counts = read_counts(c, name)
        return counts if counts[-1] > before + 2 else None

    counts = wait_for("the restored counter to move on", moved_on)
    # One unbroken run 0..n: the restored process carried on from its memory (no reset to 0), and the
    # restored /count matches the moment of the dump (no gaps, no repeats).
    assert counts == list(range(len(counts))), counts
    assert counts[-1] > before


def test_cri_pod_and_container_lifecycle(containerd: Containerd) -> None:
    with containerd.cri() as cri:
        version = cri.version()
        assert version.runtime_name == "containerd"
        assert version.runtime_version.lstrip("v").startswith(containerd.binaries.version)

        config = cri.pod_config("smoke")
        pod = cri.run_pod(config)
        status = cri.pod_status(pod)
        assert status.state == pb.SANDBOX_READY
        assert ipaddress.ip_address(status.network.ip) in ipaddress.ip_network(containerd.subnet)

        cid = cri.create_container(pod, config, "sleeper", BUSYBOX_IMAGE, command=["sleep", "3600"])
        assert cri.container_status(cid).state == pb.CONTAINER_CREATED
        cri.start_container(cid)
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
        r = cri.exec_sync(cid, ["sh", "-c", "echo $((6 * 7)); hostname"])
        assert (r.exit_code, r.stdout, r.stderr) == (0, b"42\nsmoke\n", b"")

        cri.stop_container(cid, grace_s=0)
        status = cri.container_status(cid)
        assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, 137)  # SIGKILL
        cri.remove_container(cid)
        assert cri.list_containers(pod) == []

        cri.stop_pod(pod)
        assert cri.pod_status(pod).state == pb.SANDBOX_NOTREADY
        cri.remove_pod(pod)
        assert pod not in [p.id for p in cri.list_pods()]


def test_cri_checkpoint_archive_is_readable_by_checkpointctl(
    containerd_factory: Callable[..., Containerd], stack: Stack, tmp_path: Path
) -> None:
    c = containerd_factory("2.1")  # containerd 1.6 has no CRI CheckpointContainer
    with c.cri() as cri:
        config = cri.pod_config("ckpt")
        pod = cri.run_pod(config)
        cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER])
        cri.start_container(cid)
        wait_for("the counter to start", lambda: cri.exec_sync(cid, ["cat", "/count"]).stdout)

        archive = tmp_path / "counter.tar"
        cri.checkpoint_container(cid, archive)
        # Checkpointing leaves the container running.
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING

    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"config.dump", "spec.dump", "rootfs-diff.tar"} <= names, sorted(names)
    assert any(n.startswith("checkpoint/") and n.endswith(".img") for n in names), sorted(names)

    shown = subprocess.run([str(stack.checkpointctl), "show", str(archive)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    # Its table names the container, its image, its short id and the engine that wrote the archive.
    for expected in ("counter", BUSYBOX_IMAGE, cid[:12], "containerd"):
        assert expected in shown.stdout, shown.stdout
