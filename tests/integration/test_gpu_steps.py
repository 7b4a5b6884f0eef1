"""GPU steps in the right order around the freeze and CRIU, on the real containerd/runc/CRIU stack.

The only double is the CUDA driver: the named fake in tests/fakes/fakegpu (libcuda.so.1 and
libnvidia-ml.so.1 with the real ABI), loaded by a real kybernate-hookd. Its event log records, for
every driver call, whether the target was alive and whether its cgroup was frozen at that moment.
A container process is a fake CUDA process when its environment says so (FAKEGPU_PROC=...); the
driver keys its state by that id, so a process restored by CRIU is found checkpointed, as with the
real driver.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RUNTIME
from harness.containerd import Containerd
from harness.containerd_api import ContainerdApi, criu_checkpoint
from harness.gpunode import G0, G1, H100, GiB, GpuNode, fakegpu
from harness.images import BUSYBOX_IMAGE
from harness.workload import read_counts, task_pid, task_status, wait_for

pytestmark = pytest.mark.stack

# The workload is the fake CUDA process; the `sleep`s it spawns must not inherit that identity.
COUNTER = "i=0; while true; do echo $i >> /count; i=$((i+1)); env -u FAKEGPU_PROC sleep 0.2; done"


@pytest.fixture
def gpu(tmp_path: Path) -> Iterator[GpuNode]:
    node = GpuNode(tmp_path)
    try:
        yield node
    finally:
        node.stop()


def run_gpu(c: Containerd, gpu: GpuNode, name: str, proc_id: str, **kw: object) -> None:
    c.ctr("run", "-d", "--runtime", RUNTIME, *gpu.container_env(proc_id, **kw), BUSYBOX_IMAGE, name, "sh", "-c", COUNTER)







def ops(events: list[fakegpu.Event]) -> list[tuple[str, int]]:
    return [(e.op, e.pid) for e in events]


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_checkpoint_exit_and_restore_put_gpu_steps_around_freeze_and_criu(kyb_factory, gpu: GpuNode, version) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "train", "p-train")
    wait_for("the counter", lambda: len(read_counts(c, "train")) > 3)
    before = read_counts(c, "train")[-1]
    old_pid = task_pid(c, "train")

    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("train", exit=True)
        assert task_status(c, "train") == "STOPPED"
        c.ctr("tasks", "delete", "train")
        api.create_task_from_checkpoint("train", criu_checkpoint(descriptors))
        new_pid = api.start_task("train")

    events = gpu.events("p-train")
    assert ops(events) == [("lock", old_pid), ("checkpoint", old_pid), ("restore", new_pid), ("unlock", new_pid)]
    lock, checkpoint, restore, unlock = events
    # The lock came before the freeze (a frozen cgroup cannot be locked), the GPU checkpoint before
    # CRIU dumped and ended the process; GPU restore + unlock only once runc had restored it.
    assert all(e.result == "CUDA_SUCCESS" for e in events)
    assert not lock.frozen and lock.alive and not checkpoint.frozen and checkpoint.alive
    assert restore.alive and not restore.frozen and unlock.state == "RUNNING"
    assert restore.pairs in (0, -1) and restore.gpu == G0
    assert gpu.node.state("p-train").get("state") in ("RUNNING", "running")
    resumed = wait_for("the restored counter", lambda: (n := read_counts(c, "train")) and n[-1] > before + 1 and n)
    assert resumed == list(range(len(resumed)))


def test_pause_is_hot_standby_and_resume_brings_the_gpu_back(kyb_factory, gpu: GpuNode) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "idle", "p-idle")
    wait_for("the counter", lambda: len(read_counts(c, "idle")) > 2)
    pid = task_pid(c, "idle")

    c.ctr("tasks", "pause", "idle")
    assert task_status(c, "idle") == "PAUSED"
    assert gpu.node.state("p-idle").get("state", "").upper() == "CHECKPOINTED"
    assert ops(gpu.events("p-idle")) == [("lock", pid), ("checkpoint", pid)]
    assert not gpu.events("p-idle")[0].frozen

    c.ctr("tasks", "resume", "idle")
    assert ops(gpu.events("p-idle"))[2:] == [("restore", pid), ("unlock", pid)]
    assert not gpu.events("p-idle")[2].frozen  # restored after the thaw
    assert gpu.node.state("p-idle").get("state", "").upper() == "RUNNING"
    last = read_counts(c, "idle")[-1]
    wait_for("the counter to go on", lambda: read_counts(c, "idle")[-1] > last)


def test_failed_criu_dump_rolls_the_gpu_back_and_the_workload_runs_on(kyb_factory, gpu: GpuNode) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "keep", "p-keep")
    wait_for("the counter", lambda: len(read_counts(c, "keep")) > 2)
    pid = task_pid(c, "keep")
    # An image path CRIU cannot write to makes the dump fail after the GPU was checkpointed.
    r = c.ctr("tasks", "checkpoint", "--image-path", "/proc/kybernate-cannot-write-here", "keep", check=False)
    assert r.returncode != 0

    assert task_status(c, "keep") == "RUNNING"
    assert ops(gpu.events("p-keep")) == [("lock", pid), ("checkpoint", pid), ("restore", pid), ("unlock", pid)]
    assert gpu.node.state("p-keep").get("state", "").upper() == "RUNNING"
    last = read_counts(c, "keep")[-1]
    wait_for("the counter to go on", lambda: read_counts(c, "keep")[-1] > last)


def test_lock_timeout_fails_the_pause_and_leaves_the_task_running(kyb_factory, gpu: GpuNode) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml(lock_timeout_ms=300))
    run_gpu(c, gpu, "busy", "p-busy")
    wait_for("the counter", lambda: len(read_counts(c, "busy")) > 2)
    # Submitted GPU work that takes 5 s to drain: longer than the 300 ms lock timeout.
    gpu.node.set_faults(["lock busy 5000"])

    r = c.ctr("tasks", "pause", "busy", check=False)
    assert r.returncode != 0
    assert "lock" in r.stderr and "CUDA_ERROR" in r.stderr, r.stderr
    assert task_status(c, "busy") == "RUNNING"
    gpu.node.clear_faults()
    assert gpu.node.state("p-busy").get("state", "RUNNING").upper() == "RUNNING"
    last = read_counts(c, "busy")[-1]
    wait_for("the counter to go on", lambda: read_counts(c, "busy")[-1] > last)


def test_hookd_down_fails_gpu_checkpoints_clearly_and_plain_containers_do_not_care(kyb_factory, gpu: GpuNode) -> None:
    c = kyb_factory("2.1", runtime_toml='[kybernate]\nhookd_socket = "/run/kyb-test/no-hookd-here.sock"\n')
    run_gpu(c, gpu, "g", "p-g")
    c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_IMAGE, "plain", "sleep", "600")
    wait_for("the counter", lambda: len(read_counts(c, "g")) > 2)

    r = c.ctr("containers", "checkpoint", "--task", "g", "kyb.local/ckpt/g:1", check=False)
    assert r.returncode != 0
    assert "kybernate-hookd is not reachable" in r.stderr, r.stderr
    assert task_status(c, "g") == "RUNNING"
    last = read_counts(c, "g")[-1]
    wait_for("the GPU workload to go on", lambda: read_counts(c, "g")[-1] > last)
    assert gpu.events("p-g") == []  # nothing touched its GPU state

    c.ctr("tasks", "pause", "plain")
    c.ctr("tasks", "resume", "plain")
    c.ctr("containers", "checkpoint", "--task", "plain", "kyb.local/ckpt/plain:1")
    assert task_status(c, "plain") == "RUNNING"


def test_restore_is_refused_without_enough_free_vram_and_works_once_there_is(kyb_factory, gpu: GpuNode) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "big", "p-big", vram=40 * GiB)
    wait_for("the counter", lambda: len(read_counts(c, "big")) > 2)
    c.ctr("tasks", "pause", "big")  # VRAM now in host memory
    hog = gpu.node.spawn("hog", G0, 60 * GiB)
    try:
        wait_for("the hog to be seen", lambda: Path(f"/proc/{hog.pid}").exists())
        r = c.ctr("tasks", "resume", "big", check=False)
        assert r.returncode != 0
        assert "VRAM" in r.stderr or "vram" in r.stderr, r.stderr
        # The task was paused again: containerd's view matches the GPU's (parked), and a resume retries.
        assert "paused again" in r.stderr and task_status(c, "big") == "PAUSED"
        # Refused before any driver call: the process stays checkpointed, restorable.
        assert gpu.node.state("p-big").get("state", "").upper() == "CHECKPOINTED"
        assert "restore" not in [op for op, _ in ops(gpu.events("p-big"))]
    finally:
        hog.kill()
        hog.wait()
    # Retrying: a plain resume restores.
    c.ctr("tasks", "resume", "big")
    assert gpu.node.state("p-big").get("state", "").upper() == "RUNNING"


def test_restore_on_another_gpu_passes_the_pairs(kyb_factory, gpu: GpuNode) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "mv", "p-mv", gpu_uuid=G0)
    wait_for("the counter", lambda: len(read_counts(c, "mv")) > 2)
    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("mv", exit=True)
        c.ctr("tasks", "delete", "mv")
        # "Another node": G0 is gone, an identical G1 is there.
        gpu.node.set_gpus([fakegpu.FakeGpu(G1, H100, 80 * GiB)])
        api.create_task_from_checkpoint("mv", criu_checkpoint(descriptors))
        api.start_task("mv")
    restore = [e for e in gpu.events("p-mv") if e.op == "restore"][-1]
    assert restore.result == "CUDA_SUCCESS"
    assert restore.pairs == 1 and restore.gpu == G1
    assert gpu.node.state("p-mv").get("state", "").upper() == "RUNNING"


def test_cri_archive_carries_the_gpu_manifest_and_a_new_pod_gets_its_gpu_state_back(
    kyb_factory, gpu: GpuNode, tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml() + f'checkpoint_dir = "{checkpoints}"\n')
    env = {"NVIDIA_VISIBLE_DEVICES": "all", **gpu.node.env, **gpu.node.process_env("p-pod", G0, 2 * GiB)}
    with c.cri() as cri:
        config = cri.pod_config("a")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        cri.start_container(cid)
        wait_for("the counter", lambda: len(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()) > 3)
        cri.checkpoint_container(cid, checkpoints / "trainer.tar")
        # CRI's checkpoint leaves the container running, its GPU state back on the GPU.
        assert gpu.node.state("p-pod").get("state", "").upper() == "RUNNING"
        cri.stop_pod(pod)
        cri.remove_pod(pod)

    with tarfile.open(checkpoints / "trainer.tar") as tar:
        manifest = json.load(tar.extractfile("checkpoint/kybernate.json"))  # type: ignore[arg-type]
    assert [p["gpu_uuids"] for p in manifest["processes"]] == [[G0]]
    assert [g["uuid"] for g in manifest["gpus"]] == [G0]

    with c.cri() as cri:
        config = cri.pod_config("b", annotations={"kybernate.io/restore-from": "trainer.tar"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        cri.start_container(cid)
        restore, unlock = gpu.events("p-pod")[-2:]
        assert (restore.op, unlock.op) == ("restore", "unlock")
        assert restore.alive and not restore.frozen and restore.result == "CUDA_SUCCESS"
        assert gpu.node.state("p-pod").get("state", "").upper() == "RUNNING"
        last = int(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()[-1])
        wait_for("the counter to go on", lambda: int(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()[-1]) > last)


def test_restore_on_the_same_node_lands_on_the_gpu_the_annotation_names(kyb_factory, gpu: GpuNode) -> None:
    """Both GPUs here (issue 17): without a map hookd keeps G0; kybernate.io/gpu-map sends it to G1."""
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    c.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"kybernate.io/gpu-map={G0}={G1}",
          *gpu.container_env("p-map", gpu_uuid=G0), BUSYBOX_IMAGE, "map", "sh", "-c", COUNTER)
    wait_for("the counter", lambda: len(read_counts(c, "map")) > 2)
    before = read_counts(c, "map")[-1]
    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("map", exit=True)
        c.ctr("tasks", "delete", "map")
        api.create_task_from_checkpoint("map", criu_checkpoint(descriptors))
        api.start_task("map")
    restore = [e for e in gpu.events("p-map") if e.op == "restore"][-1]
    assert restore.result == "CUDA_SUCCESS" and (restore.pairs, restore.gpu) == (1, G1)
    assert gpu.node.state("p-map").get("state", "").upper() == "RUNNING"
    wait_for("the counter to go on", lambda: read_counts(c, "map")[-1] > before + 1)

