"""Standby's disk tier (hibernate) through a real kybernate-hookd: `kybernate park --tier disk` hibernates a GPU
workload into hookd's store (a complete generation, manifest last) while containerd keeps seeing the task;
`kybernate wake` restores it into the same container from the verified generation, through the arbiter; RAM-parked
workloads over `--standby-ram-budget` are demoted to disk; a hookd restarted while a workload is hibernated manages
it again. containerd 1.6.20 and 2.1.9, runc, CRIU, the fake CUDA driver."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RUNTIME, VENV_BIN, processes, store_flags
from harness.containerd import Containerd, CtrError
from harness.gpunode import G0, G1, GiB, GpuNode
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, read_counts, task_status, wait_for

from kybernate.hooks.api import store as store_layout
from kybernate.hooks.containerd.client import ContainerdClient

pytestmark = pytest.mark.stack


@pytest.fixture
def gpu(tmp_path: Path) -> Iterator[GpuNode]:
    node = GpuNode(tmp_path)
    try:
        yield node
    finally:
        node.stop()


def standby(gpu: GpuNode, c: Containerd, tmp: Path, *more: str) -> Path:
    """hookd with standby and the store on, against containerd `c`; returns the store's root."""
    store = tmp / "store"
    gpu.stop_hookd_gracefully()
    gpu.hookd_args = store_flags(c, store, tmp / "registry.db")
    gpu.extra_args = ["--standby", "--standby-sample-period-s", "0.2", "--standby-state-dir", str(tmp / "standby"),
                      "--standby-retry-s", "0.5", *more]
    gpu.start()
    return store


def kybernate(gpu: GpuNode, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(VENV_BIN / "kybernate"), *args, "--socket", gpu.socket], capture_output=True,
                       text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def status(gpu: GpuNode, name: str) -> dict[str, object]:
    return dict(json.loads(kybernate(gpu, "status", name, "--json").stdout.splitlines()[0]))


def log_lines(gpu: GpuNode, msg: str) -> list[str]:
    return [line for line in gpu.log.read_text().splitlines() if f'msg="{msg}"' in line or f"msg={msg} " in line]


def counts(c: Containerd, name: str) -> list[int]:
    try:
        return read_counts(c, name)
    except CtrError:
        return []


def run_counter(c: Containerd, gpu: GpuNode, name: str, proc_id: str, *annotations: str, on: str = G0) -> int:
    notes = [arg for a in annotations for arg in ("--annotation", f"kybernate.io/{a}")]
    c.ctr("run", "-d", "--runtime", RUNTIME, *notes, *gpu.container_env(proc_id, on, vram=2 * GiB), BUSYBOX_IMAGE,
          name, "sh", "-c", COUNTER)
    return wait_for("the counter", lambda: (n := counts(c, name)) and len(n) > 3 and n)[-1]


def task_pid(c: Containerd, name: str) -> int:
    with ContainerdClient(c.address, c.namespace) as api:
        return api.get_task(name).pid


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_park_disk_hibernates_into_the_store_and_wake_restores_also_after_a_hookd_restart(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    store = standby(gpu, c, tmp_path)
    before = run_counter(c, gpu, "cnt", "p-cnt")
    pid = task_pid(c, "cnt")

    out = kybernate(gpu, "park", "cnt", "--tier", "disk").stdout
    assert "parked" in out and "disk" in out
    s = status(gpu, "cnt")
    assert s["state"] == "parked" and s["tier"] == "disk" and s["parked_by"] == "api"
    # The processes are gone; containerd sees the task running with its pid.
    assert pid not in processes() and task_status(c, "cnt") == "RUNNING" and task_pid(c, "cnt") == pid
    assert [e.op for e in gpu.events("p-cnt")] == ["lock", "checkpoint"]
    # A normal, complete store generation of the workload's key, GPU manifest included.
    key = f"{c.namespace}_cnt"
    gen = store_layout.Store(str(store)).open(key)
    store_layout.Store(str(store)).verify(gen)
    assert {"checkpoint/inventory.img", "checkpoint/kybernate.json", "manifest.json"} - {"manifest.json"} <= {
        f.path for f in gen.manifest.files}
    assert f"generation={key}@1" in log_lines(gpu, "standby parked")[-1] and "tier=disk" in log_lines(
        gpu, "standby parked")[-1]

    # hookd killed and started again: the hibernated workload is still managed, and wakes.
    gpu.kill9()
    gpu.start()
    wait_for("the restarted hookd to list the workload", lambda: kybernate(gpu, "status", "cnt", check=False)
             .returncode == 0 and status(gpu, "cnt")["tier"] == "disk")
    out = kybernate(gpu, "wake", "cnt").stdout
    assert "running" in out
    assert task_status(c, "cnt") == "RUNNING" and gpu.gpu_state("p-cnt") == "RUNNING"
    assert [e.op for e in gpu.events("p-cnt")][-2:] == ["restore", "unlock"]
    after = wait_for("the restored counter to move on", lambda: (n := counts(c, "cnt")) and n[-1] > before + 3 and n)
    assert after == list(range(len(after)))
    assert "tier=disk" in log_lines(gpu, "standby woke")[-1]
    # A second wake says it is not parked; the generation is still there (retention decides, not the wake).
    r = kybernate(gpu, "wake", "cnt", check=False)
    assert r.returncode == 1 and "not parked" in r.stderr
    assert store_layout.Store(str(store)).generations(key) == [1]
    c.ctr("tasks", "kill", "-s", "SIGKILL", "cnt")


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_ram_parked_workloads_over_the_ram_budget_are_demoted_to_disk(kyb_factory, gpu: GpuNode, tmp_path: Path,
                                                                      version: str) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    # A budget of one byte: the fake driver moves no real VRAM into host RAM, so the cgroup's own memory has to do.
    standby(gpu, c, tmp_path, "--standby-ram-budget", "1")
    before = run_counter(c, gpu, "cnt", "p-dem")
    kybernate(gpu, "park", "cnt")  # ram: Pause, VRAM to host RAM; the budget is exceeded at once

    wait_for("the demotion", lambda: status(gpu, "cnt")["tier"] == "disk", 120)
    s = status(gpu, "cnt")
    assert s["state"] == "parked" and s["parked_by"] == "demote" and "over the budget" in str(s["reason"])
    assert log_lines(gpu, "standby demote") and log_lines(gpu, "standby demoted")
    # It was paused when it was dumped: containerd still sees it paused, no process.
    assert task_status(c, "cnt") == "PAUSED"
    ops = [e.op for e in gpu.events("p-dem")]
    assert ops == ["lock", "checkpoint"]  # the dump needed no second GPU checkpoint: its state was in RAM

    kybernate(gpu, "wake", "cnt")
    assert task_status(c, "cnt") == "RUNNING" and gpu.gpu_state("p-dem") == "RUNNING"
    after = wait_for("the counter to move on", lambda: (n := counts(c, "cnt")) and n[-1] > before + 3 and n)
    assert after == list(range(len(after)))
    c.ctr("tasks", "kill", "-s", "SIGKILL", "cnt")


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_a_hibernated_workload_wakes_on_the_allowed_gpu_with_room_and_falls_back_when_the_driver_refuses(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:
    """The disk tier's wake (the shim's Wake: CRIU restore, then the shim's Start calls RestoreGpu) takes hookd's
    GPU override like a Resume does (docs/standby.md, "Multiplexing across GPUs")."""
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    standby(gpu, c, tmp_path, "--standby-gpu-budget", f"{G0}=2Gi", "--standby-gpu-budget", f"{G1}=2Gi")
    opted = ("standby=true", "standby-idle=1h", "standby-wake=api")
    before = run_counter(c, gpu, "cnt", "p-cnt", *opted, f"standby-gpus={G0},{G1}")
    kybernate(gpu, "park", "cnt", "--tier", "disk")
    run_counter(c, gpu, "fill0", "p-fill0", *opted)  # GPU 0's budget is full while cnt is hibernated
    wait_for("hookd to see fill0", lambda: status(gpu, "fill0").get("vram_bytes") == str(2 * GiB))

    kybernate(gpu, "wake", "cnt")
    assert task_status(c, "cnt") == "RUNNING" and gpu.gpu_state("p-cnt") == "RUNNING"
    assert gpu.node.state("p-cnt")["gpu"] == G1 and gpu.gpu_state("p-fill0") == "RUNNING"
    restore = [e for e in gpu.events("p-cnt") if e.op == "restore"][-1]
    assert (restore.pairs, restore.gpu, restore.result) == (1, G1, "CUDA_SUCCESS")
    assert f"gpu={G1}" in log_lines(gpu, "standby placement")[-1] and "tier=disk" in log_lines(gpu, "standby woke")[-1]
    after = wait_for("the restored counter to move on", lambda: (n := counts(c, "cnt")) and n[-1] > before + 3 and n)
    assert after == list(range(len(after)))

    # Hibernated again (its GPU is now GPU 1), GPU 1 filled, GPU 0 freed; the driver refuses GPU pairs: the restore
    # onto GPU 0 fails, the workload stays hibernated, and the same wake brings it back on GPU 1 after the arbiter
    # parked fill1.
    kybernate(gpu, "park", "cnt", "--tier", "disk")
    kybernate(gpu, "park", "fill0")
    run_counter(c, gpu, "fill1", "p-fill1", *opted, on=G1)
    wait_for("hookd to see fill1", lambda: status(gpu, "fill1").get("vram_bytes") == str(2 * GiB))
    gpu.node.set_faults(["restore fail CUDA_ERROR_INVALID_VALUE pairs"])
    kybernate(gpu, "wake", "cnt")
    assert task_status(c, "cnt") == "RUNNING" and gpu.gpu_state("p-cnt") == "RUNNING"
    assert gpu.node.state("p-cnt")["gpu"] == G1 and gpu.gpu_state("p-fill1") == "CHECKPOINTED"
    tried, done = [e for e in gpu.events("p-cnt") if e.op == "restore"][-2:]
    assert (tried.pairs, tried.result) == (1, "CUDA_ERROR_INVALID_VALUE") and (done.pairs, done.gpu) == (0, G1)
    assert len([line for line in gpu.log.read_text().splitlines()
                if "the driver refuses to restore onto another GPU" in line]) == 1
    restored = wait_for("the counter after the fallback", lambda: (n := counts(c, "cnt")) and n[-1] > after[-1] + 3
                        and n)
    # Nothing lost: every count up to the last, in order. The failed wake's processes ran between CRIU's restore and
    # the failed GPU restore (a CPU-only counter gets a tick in), so the retry may print a count once more.
    assert sorted(set(restored)) == list(range(restored[-1] + 1)) and restored == sorted(restored)
    c.ctr("tasks", "kill", "-s", "SIGKILL", "cnt")
