"""Fault injection: nothing stranded after a crash or a failed step, on the real containerd/runc/CRIU stack.

Each case injects one fault into a GPU lifecycle step (the fake driver is the only double) and then
asserts "nothing stranded" after at most one documented retry, or after hookd's own reconciliation
(polled on the fake driver's state with a generous bound): the workload runs with its GPU state RUNNING
and containerd says RUNNING, or it is stopped cleanly with an error that says so. The session prints a
table of faults tried / survived (tests/integration/conftest.py). docs/lifecycle.md explains each rule.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import RUNTIME
from harness.containerd import Containerd, CtrError
from harness.containerd_api import ContainerdApi, ContainerdError, criu_checkpoint
from harness.gpunode import G0, GiB, GpuNode
from harness.images import BUSYBOX_IMAGE
from harness.workload import read_counts, task_pid, task_status, wait_for

pytestmark = pytest.mark.stack

COUNTER = "i=0; while true; do echo $i >> /count; i=$((i+1)); env -u FAKEGPU_PROC sleep 0.2; done"
# hookd's reconcile period in these tests, and the bound within which a stranded process must be back.
RECONCILE_PERIOD_S = 1.0
RECONCILED_WITHIN_S = 30.0
BOTH = pytest.mark.parametrize("version", ["1.6", "2.1"])


@pytest.fixture
def gpu(tmp_path: Path) -> Iterator[GpuNode]:
    node = GpuNode(tmp_path, reconcile_period_s=RECONCILE_PERIOD_S)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def background() -> Iterator[Callable[..., Future[Any]]]:
    pool = ThreadPoolExecutor(max_workers=2)
    yield pool.submit
    pool.shutdown(wait=True)


def run_gpu(c: Containerd, gpu: GpuNode, name: str, proc: str, *extra: str, vram: int = 2 * GiB) -> int:
    c.ctr("run", "-d", "--runtime", RUNTIME, *extra, *gpu.container_env(proc, vram=vram), BUSYBOX_IMAGE, name,
          "sh", "-c", COUNTER)
    wait_for("the counter", lambda: len(read_counts(c, name)) > 2)
    return task_pid(c, name)


def live_cuda_pids(gpu: GpuNode, proc: str) -> list[int]:
    """Live processes that are the fake CUDA process `proc` of this node (found by their environment)."""
    marker = f"FAKEGPU_PROC={proc}\0".encode()
    node = f"FAKEGPU_STATE_DIR={gpu.node.dir}\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                env = Path(f"/proc/{entry.name}/environ").read_bytes()
                state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in env and node in env and state != "Z":
                found.append(int(entry.name))
    return found


def assert_running_with_gpu(c: Containerd, gpu: GpuNode, name: str, proc: str) -> None:
    """The good end state: containerd says RUNNING, the driver says RUNNING, the workload makes progress."""
    assert task_status(c, name) == "RUNNING"
    assert gpu.gpu_state(proc) == "RUNNING"
    last = wait_for("the workload's count", lambda: read_counts(c, name))[-1]
    wait_for("the workload to go on", lambda: (n := read_counts(c, name)) and n[-1] > last)


def assert_stopped_cleanly(c: Containerd, gpu: GpuNode, name: str, proc: str) -> None:
    """The other allowed end: no process of the workload is left alive, and containerd agrees."""
    wait_for("the workload's processes to be gone", lambda: not live_cuda_pids(gpu, proc), 30)
    assert task_status(c, name) in (None, "STOPPED")


def wait_reconciled(gpu: GpuNode, proc: str) -> None:
    wait_for(f"hookd to reconcile {proc} to RUNNING", lambda: gpu.gpu_state(proc) == "RUNNING", RECONCILED_WITHIN_S)


def wait_event(gpu: GpuNode, proc: str, op: str, since_ns: int) -> None:
    wait_for(f"the driver to see {op} on {proc}",
             lambda: any(e.proc == proc and e.op == op and e.ns > since_ns for e in gpu.node.events()), 30)


def cycle_pause_resume(c: Containerd, gpu: GpuNode, name: str, proc: str) -> None:
    """The lifecycle works again after the fault: pause parks the GPU, resume brings it back."""
    c.ctr("tasks", "pause", name)
    assert gpu.gpu_state(proc) == "CHECKPOINTED"
    c.ctr("tasks", "resume", name)
    assert_running_with_gpu(c, gpu, name, proc)


# --- finding 1: GPU restore fails at Start of a restored task ---------------------------------------


@pytest.mark.fault("restore at Start: VRAM short")
@BOTH
def test_start_with_short_vram_stops_the_task_and_a_second_start_works(kyb_factory, gpu: GpuNode, version) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "big", "p-big", vram=40 * GiB)
    hog = None
    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("big", exit=True)
        c.ctr("tasks", "delete", "big")
        api.create_task_from_checkpoint("big", criu_checkpoint(descriptors))
        hog = gpu.node.spawn("hog", G0, 60 * GiB)
        wait_for("the hog to hold its VRAM", lambda: live_cuda_pids(gpu, "hog"))
        try:
            with pytest.raises(ContainerdError) as failed:
                api.start_task("big")
            assert "VRAM" in failed.value.details and "stopped" in failed.value.details, failed.value.details
            assert_stopped_cleanly(c, gpu, "big", "p-big")
        finally:
            hog.kill()
            hog.wait()
        # The documented retry: the checkpoint is unchanged; create the task from it again.
        c.ctr("tasks", "delete", "big", check=False)
        api.create_task_from_checkpoint("big", criu_checkpoint(descriptors))
        api.start_task("big")
    assert_running_with_gpu(c, gpu, "big", "p-big")


@pytest.mark.fault("restore at Start: hookd killed")
@BOTH
def test_start_with_hookd_dead_stops_the_task_and_works_once_hookd_is_back(kyb_factory, gpu: GpuNode,
                                                                           version) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "g", "p-g")
    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("g", exit=True)
        c.ctr("tasks", "delete", "g")
        api.create_task_from_checkpoint("g", criu_checkpoint(descriptors))
        gpu.kill9()
        with pytest.raises(ContainerdError) as failed:
            api.start_task("g")
        assert failed.value.code is not None and failed.value.code.name == "UNAVAILABLE", failed.value
        assert "not reachable" in failed.value.details and "stopped" in failed.value.details
        assert_stopped_cleanly(c, gpu, "g", "p-g")
        gpu.start()
        c.ctr("tasks", "delete", "g", check=False)
        api.create_task_from_checkpoint("g", criu_checkpoint(descriptors))
        api.start_task("g")
    assert_running_with_gpu(c, gpu, "g", "p-g")


def cri_archive(c: Containerd, gpu: GpuNode, archive: Path, env: dict[str, str]) -> None:
    """A GPU pod checkpointed by CRI into `archive`, then removed."""
    with c.cri() as cri:
        config = cri.pod_config("a")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        cri.start_container(cid)
        wait_for("the counter", lambda: len(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()) > 3)
        cri.checkpoint_container(cid, archive)
        cri.stop_pod(pod)
        cri.remove_pod(pod)


@pytest.mark.fault("restore at Start via CRI: VRAM short")
def test_cri_start_with_short_vram_reads_exited_and_the_pod_can_be_removed(kyb_factory, gpu: GpuNode,
                                                                          tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml() + f'checkpoint_dir = "{checkpoints}"\n')
    env = {"NVIDIA_VISIBLE_DEVICES": "all", **gpu.node.env, **gpu.node.process_env("p-cri", G0, 40 * GiB)}
    cri_archive(c, gpu, checkpoints / "big.tar", env)
    # The fake keys driver state by process id, and the pod that was checkpointed ran on (RUNNING); the
    # archive's image was taken CHECKPOINTED, which is what the real driver finds in a restored process.
    record = gpu.node.dir / "procs" / "p-cri"
    record.write_text("".join("state=CHECKPOINTED\n" if line.startswith("state=") else line + "\n"
                              for line in record.read_text().splitlines()))
    hog = gpu.node.spawn("hog", G0, 60 * GiB)
    wait_for("the hog to hold its VRAM", lambda: live_cuda_pids(gpu, "hog"))
    try:
        with c.cri() as cri:
            config = cri.pod_config("b", annotations={"kybernate.io/restore-from": "big.tar"})
            pod = cri.run_pod(config, runtime_handler="kybernate")
            cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
            with pytest.raises(Exception, match="VRAM") as failed:
                cri.start_container(cid)
            assert "stopped" in str(failed.value)
            # CRI's view is the truth: the container exited and nothing of it runs; the pod goes away cleanly.
            wait_for("nothing of the workload left", lambda: not live_cuda_pids(gpu, "p-cri"), 30)
            assert cri.container_status(cid).state != pb_running()
            cri.stop_pod(pod)
            cri.remove_pod(pod)
    finally:
        hog.kill()
        hog.wait()
    with c.cri() as cri:  # the retry: a new pod from the same, unchanged archive
        config = cri.pod_config("c", annotations={"kybernate.io/restore-from": "big.tar"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        cri.start_container(cid)
        assert gpu.gpu_state("p-cri") == "RUNNING"
        last = int(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()[-1])
        wait_for("the counter to go on", lambda: int(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()[-1]) > last)


def pb_running() -> int:
    from harness.cri import pb

    return int(pb.CONTAINER_RUNNING)


@pytest.mark.fault("restore at Start: wrong-typed manifest")
def test_a_wrong_typed_manifest_fails_the_create_with_a_clear_error(kyb_factory, gpu: GpuNode, tmp_path: Path) -> None:
    # containerd 2.1 only: the archive is made by CRI's CheckpointContainer, which 1.6 lacks; the shim reads
    # the manifest at Create the same way on both.
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml() + f'checkpoint_dir = "{checkpoints}"\n')
    env = {"NVIDIA_VISIBLE_DEVICES": "all", **gpu.node.env, **gpu.node.process_env("p-pod", G0, 2 * GiB)}
    cri_archive(c, gpu, checkpoints / "good.tar", env)
    _rewrite_manifest(checkpoints / "good.tar", checkpoints / "bad.tar",
                      lambda m: {**m, "processes": [{**p, "pid": "one"} for p in m["processes"]]})
    with c.cri() as cri:
        config = cri.pod_config("b", annotations={"kybernate.io/restore-from": "bad.tar"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        with pytest.raises(Exception) as failed:  # CRI creates the task at StartContainer
            cri.start_container(cid)
        text = str(failed.value)
        assert "INVALID_ARGUMENT" in text and "manifest" in text and "internal error" not in text, text
        assert not live_cuda_pids(gpu, "p-pod")
        cri.stop_pod(pod)
        cri.remove_pod(pod)


def _rewrite_manifest(src: Path, dst: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member) if member.isfile() else None
            if member.name == "checkpoint/kybernate.json" and data is not None:
                body = json.dumps(change(json.load(data))).encode()
                member.size = len(body)
                tout.addfile(member, io.BytesIO(body))
            else:
                tout.addfile(member, data)


# --- finding 2: hookd killed mid-step --------------------------------------------------------------


@pytest.mark.fault("hookd kill -9 during GPU checkpoint in Pause")
@BOTH
def test_hookd_killed_during_pause_is_reconciled_when_it_restarts(kyb_factory, gpu: GpuNode, version,
                                                                  background) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "p", "p-p")
    gpu.node.set_faults(["checkpoint delay 20000 proc=p-p"])
    t0 = time.monotonic_ns()
    pausing = background(c.ctr, "tasks", "pause", "p", check=False)
    wait_event(gpu, "p-p", "lock", t0)  # hookd is now inside the GPU checkpoint
    gpu.kill9()
    result = pausing.result(60)
    assert result.returncode != 0 and "not reachable" in result.stderr, result.stderr
    assert task_status(c, "p") == "RUNNING"
    assert gpu.gpu_state("p-p") in ("LOCKED", "CHECKPOINTED")  # stranded until hookd is back
    gpu.node.clear_faults()
    gpu.start()  # systemd restarts it; its reconciler finds the intent "running"
    wait_reconciled(gpu, "p-p")
    assert_running_with_gpu(c, gpu, "p", "p-p")
    cycle_pause_resume(c, gpu, "p", "p-p")


@pytest.mark.fault("hookd kill -9 during GPU checkpoint in Checkpoint")
@BOTH
def test_hookd_killed_during_checkpoint_is_reconciled_when_it_restarts(kyb_factory, gpu: GpuNode, version,
                                                                       background) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "k", "p-k")
    gpu.node.set_faults(["checkpoint delay 20000 proc=p-k"])
    t0 = time.monotonic_ns()
    with ContainerdApi(c.address, c.namespace) as api:
        dumping = background(api.checkpoint_task, "k", False, pause=False)
        wait_event(gpu, "p-k", "lock", t0)
        gpu.kill9()
        with pytest.raises(ContainerdError, match="not reachable"):
            dumping.result(60)
    assert task_status(c, "k") == "RUNNING"
    gpu.node.clear_faults()
    gpu.start()
    wait_reconciled(gpu, "p-k")
    assert_running_with_gpu(c, gpu, "k", "p-k")


@pytest.mark.fault("hookd kill -9 during restore in Resume")
@BOTH
def test_hookd_killed_during_resume_leaves_it_paused_and_a_plain_resume_works(kyb_factory, gpu: GpuNode, version,
                                                                              background) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "r", "p-r")
    c.ctr("tasks", "pause", "r")
    gpu.node.set_faults(["restore delay 20000 proc=p-r"])
    t0 = time.monotonic_ns()
    resuming = background(c.ctr, "tasks", "resume", "r", check=False)
    wait_event(gpu, "p-r", "get_state", t0)  # hookd is inside RestoreGpu
    gpu.kill9()
    result = resuming.result(60)
    assert result.returncode != 0 and "paused again" in result.stderr, result.stderr
    # containerd's view matches the GPU's: parked, not RUNNING with its GPU state in host memory.
    assert task_status(c, "r") == "PAUSED"
    gpu.node.clear_faults()
    gpu.start()
    c.ctr("tasks", "resume", "r")  # the one documented retry: a plain resume
    assert_running_with_gpu(c, gpu, "r", "p-r")


# --- finding 3: CRIU killed mid-dump ----------------------------------------------------------------


KILL_CRIU = """#!/bin/sh
# CRIU action script: at post-dump (images written, tasks still seized) kill -9 the criu that runs us.
[ "$CRTOOLS_SCRIPT_ACTION" = "post-dump" ] || exit 0
p=$PPID
while [ "$p" -gt 1 ] && [ "$(cat /proc/$p/comm)" != "criu" ]; do p=$(cut -d' ' -f4 /proc/$p/stat); done
[ "$(cat /proc/$p/comm)" = "criu" ] && kill -9 "$p"
exit 0
"""


@pytest.mark.fault("CRIU killed mid-dump")
@BOTH
def test_criu_killed_mid_dump_leaves_the_workload_running_with_its_gpu(kyb_factory, gpu: GpuNode, version,
                                                                       tmp_path: Path) -> None:
    script = tmp_path / "kill-criu.sh"
    script.write_text(KILL_CRIU)
    script.chmod(0o755)
    conf = tmp_path / "criu.conf"
    conf.write_text(f"action-script {script}\n")
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "d", "p-d", "--annotation", f"org.criu.config={conf}")
    with ContainerdApi(c.address, c.namespace) as api:
        with pytest.raises(ContainerdError) as failed:
            api.checkpoint_task("d", exit=False)  # pause, checkpoint (CRIU dies), resume: as ctr does
    assert "criu" in str(failed.value).lower() or "checkpoint" in str(failed.value).lower(), failed.value
    wait_for("containerd to show the task RUNNING", lambda: task_status(c, "d") == "RUNNING", 30)
    assert_running_with_gpu(c, gpu, "d", "p-d")


# --- more: hookd restart while parked, shim and containerd restart, disk full, two hookds ------------


@pytest.mark.fault("hookd restart while containers are parked")
def test_hookd_restart_leaves_parked_containers_parked_and_resume_works(kyb_factory, gpu: GpuNode) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    for name in ("a", "b"):
        run_gpu(c, gpu, name, f"p-{name}")
        c.ctr("tasks", "pause", name)
    gpu.stop_hookd_gracefully()
    t0 = time.monotonic_ns()
    logged = len(gpu.log.read_text())
    gpu.start()
    # Two reconcile passes after the restart: intent "parked" by a live shim is left alone, never called frozen.
    wait_for("two reconcile passes", lambda: gpu.log.read_text()[logged:].count('msg="reconcile pass"') >= 2, 30)
    assert all(not e.frozen for e in gpu.node.events() if e.ns > t0 and e.proc in ("p-a", "p-b"))
    for name in ("a", "b"):
        assert task_status(c, name) == "PAUSED" and gpu.gpu_state(f"p-{name}") == "CHECKPOINTED"
        c.ctr("tasks", "resume", name)
        assert_running_with_gpu(c, gpu, name, f"p-{name}")


@pytest.mark.fault("shim killed and containerd restarted during Resume")
def test_shim_killed_during_resume_ends_with_nothing_stranded(kyb_factory, gpu: GpuNode, background) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "s", "p-s")
    c.ctr("tasks", "pause", "s")
    gpu.node.set_faults(["restore delay 3000 proc=p-s"])
    ours = [pid for pid, argv in c.shim_pids().items()
            if any(a.endswith("containerd-shim-kybernate-v1") for a in argv[:2])]
    assert ours
    t0 = time.monotonic_ns()
    resuming = background(c.ctr, "tasks", "resume", "s", check=False)
    wait_event(gpu, "p-s", "get_state", t0)
    for pid in ours:
        os.kill(pid, 9)
    assert resuming.result(60).returncode != 0
    c.restart()
    gpu.node.clear_faults()
    # Either the task survives with its GPU back (hookd restores the orphan), or containerd cleaned it up.
    wait_for("nothing stranded", lambda: all(gpu.gpu_state("p-s") == "RUNNING" for _ in live_cuda_pids(gpu, "p-s")),
             RECONCILED_WITHIN_S)
    status = task_status(c, "s")
    if live_cuda_pids(gpu, "p-s"):
        assert status == "RUNNING", status
    else:
        assert status in (None, "STOPPED", "UNKNOWN"), status


@pytest.mark.fault("disk full during a dump")
def test_disk_full_during_a_dump_leaves_the_workload_running(kyb_factory, gpu: GpuNode, tmp_path: Path) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    run_gpu(c, gpu, "f", "p-f")
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        with pytest.raises(CtrError) as failed:
            c.ctr("tasks", "checkpoint", "--image-path", str(full), "f")
        assert "No space" in failed.value.stderr or "space" in failed.value.stderr.lower() or failed.value.stderr
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
    assert_running_with_gpu(c, gpu, "f", "p-f")


@pytest.mark.fault("two hookd instances racing on one socket")
def test_two_hookds_racing_on_one_socket_leave_exactly_one(kyb_factory, gpu: GpuNode) -> None:
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    gpu.stop_hookd_gracefully()
    first, second = gpu.spawn_hookd(), gpu.spawn_hookd()
    wait_for("one of them to give up", lambda: first.poll() is not None or second.poll() is not None, 30)
    loser, winner = (first, second) if first.poll() is not None else (second, first)
    assert loser.returncode == 2 and "already serving" in gpu.log.read_text()
    gpu.proc = winner
    wait_for("the winner to serve", lambda: winner.poll() is None and Path(gpu.socket).exists(), 30)
    run_gpu(c, gpu, "w", "p-w")
    cycle_pause_resume(c, gpu, "w", "p-w")
