"""Preemption resilience with GPU state (fake CUDA driver, real hookd, real containerd/runc/CRIU, a real S3
server), the CRI played as the kubelet plays it (docs/resilience.md):

- checkpoint-on-stop: StopContainer with a grace period stops a counter pod with fake GPU state on node A;
  the shim has hookd checkpoint it into the store first (uploaded to S3); a replacement pod with the same
  key and `resume: latest` on node B (its own containerd, store and hookd) continues the counter.
- periodic checkpoints and kill -9 (no stop): the replacement continues from the last generation, and the
  key keeps its `checkpoint-keep` generations; each checkpoint's pause is logged.
- a checkpoint-on-stop that cannot finish within its budget: the stop still completes in time, nothing
  incomplete is visible in the store, and the log says so.
"""

from __future__ import annotations

import io
import os
import re
import signal
import tarfile
import time
from pathlib import Path

import pytest
from conftest import store_flags
from harness.containerd import CRI_NAMESPACE
from harness.cri import pb
from harness.images import BUSYBOX_IMAGE
from harness.s3server import S3Server
from harness.workload import read_counts, wait_for
from test_gpu_steps import COUNTER, G0, GiB, GpuNode, gpu  # noqa: F401  (gpu: the fixture)

from kybernate.hooks.api import store as store_layout

pytestmark = pytest.mark.stack

KEY = "kybernate.io/checkpoint-key"
ON_STOP = "kybernate.io/checkpoint-on-stop"
ON_STOP_TIMEOUT = "kybernate.io/checkpoint-on-stop-timeout"
EVERY = "kybernate.io/checkpoint-every"
KEEP = "kybernate.io/checkpoint-keep"
RESUME = "kybernate.io/resume"


def counts(cri, cid: str) -> list[int]:
    return [int(x) for x in cri.exec_sync(cid, ["cat", "/count"]).stdout.split()]


def gpu_env(node: GpuNode, proc: str) -> dict[str, str]:
    return {"NVIDIA_VISIBLE_DEVICES": "all", **node.node.env, **node.node.process_env(proc, G0, 2 * GiB)}


def start_pod(cri, name: str, annotations: dict[str, str], env: dict[str, str]) -> tuple[str, str]:
    config = cri.pod_config(name, annotations=annotations)
    pod = cri.run_pod(config, runtime_handler="kybernate")
    cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
    cri.start_container(cid)
    return pod, cid


def generations(store: Path, key: str) -> list[int]:
    return store_layout.Store(str(store)).generations(key)


def stored_counts(store: Path, key: str, number: int) -> list[int]:
    """The counter's /count as the generation holds it (its rootfs diff)."""
    with tarfile.open(store / key / str(number) / "rootfs-diff.tar") as tar:
        member = tar.extractfile("count")
        assert member is not None
        return [int(x) for x in io.TextIOWrapper(member).read().split()]


def in_flight(store: Path, key: str) -> list[str]:
    try:
        return [n for n in os.listdir(store / key) if not n.isdigit()]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_stopped_on_node_a_with_checkpoint_on_stop_the_replacement_on_node_b_continues(
        kyb_factory, gpu: GpuNode, tmp_path: Path, s3_server: S3Server,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    s3 = s3_server.env("cluster")
    for name, value in s3.items():
        monkeypatch.setenv(name, value)  # the hookds upload with it, the shims download with it
    stores = {n: tmp_path / n / "store" for n in ("a", "b")}
    registries = {n: tmp_path / n / "registry.db" for n in ("a", "b")}
    for n in stores:
        stores[n].parent.mkdir()
    a = kyb_factory("2.1", runtime_toml=gpu.runtime_toml(),
                    env={"KYBERNATE_STORE": str(stores["a"]), "KYBERNATE_REGISTRY": str(registries["a"]), **s3})
    gpu.restart_hookd(store_flags(a, stores["a"], registries["a"]))
    notes = {KEY: "trainer", ON_STOP: "true", ON_STOP_TIMEOUT: "60s", RESUME: "latest"}
    env = gpu_env(gpu, "p-stop")
    with a.cri() as cri:
        pod, cid = start_pod(cri, "trainer-a", notes, env)
        first = wait_for("the counter", lambda: (n := counts(cri, cid)) and len(n) > 5 and n)
        assert first[0] == 0  # resume: latest on a key without a checkpoint: a fresh start
        last = counts(cri, cid)[-1]
        began = time.monotonic()
        cri.stop_container(cid, grace_s=30)  # the kubelet's StopContainer: SIGTERM, the grace period, SIGKILL
        stop_s = time.monotonic() - began
        status = cri.container_status(cid)
        assert status.state == pb.CONTAINER_EXITED
        # The stop went through the checkpoint: GPU locked and checkpointed while alive and not frozen, then
        # the dump ended the task (no restore on node A).
        events = gpu.events("p-stop")
        assert [e.op for e in events] == ["lock", "checkpoint"], events
        assert all(e.alive and not e.frozen and e.result == "CUDA_SUCCESS" for e in events)
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    assert stop_s < 30, stop_s  # through the dump, not through the grace period's SIGKILL
    print(f"StopContainer with checkpoint-on-stop: {stop_s:.2f} s")
    # The Kill was answered once the dump ended the task; hookd commits the generation right after.
    wait_for("the generation", lambda: generations(stores["a"], "trainer") == [1], 30)
    assert stored_counts(stores["a"], "trainer", 1)[-1] >= last
    log = a.log_text()
    # The Kill is answered once the dump has ended the task (or once hookd's answer came, if first).
    assert ("checkpoint-on-stop: the task exited through the dump" in log
            or "checkpoint-on-stop stored; the task exited through the dump" in log), log[-6000:]
    manifest = "cluster/trainer/1/manifest.json"
    wait_for("the upload to S3", lambda: manifest in {o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix="cluster/trainer/").get("Contents", [])}, 60)
    gpu.restart_hookd(store_flags(a, stores["a"], registries["a"]))  # node A's hookd ends with node A
    a.stop()

    # Node B: its own containerd, store and hookd; it has never seen the key: S3 only.
    b = kyb_factory(version, runtime_toml=gpu.runtime_toml(),
                    env={"KYBERNATE_STORE": str(stores["b"]), "KYBERNATE_REGISTRY": str(registries["b"]), **s3})
    gpu.restart_hookd(store_flags(b, stores["b"], registries["b"]))
    with b.cri() as cri:
        pod, cid = start_pod(cri, "trainer-b", notes, env)
        restore, unlock = gpu.events("p-stop")[-2:]
        assert (restore.op, unlock.op) == ("restore", "unlock")
        assert restore.alive and not restore.frozen and restore.result == "CUDA_SUCCESS"
        now = counts(cri, cid)
        held = stored_counts(stores["a"], "trainer", 1)
        assert now[:len(held)] == held and now[-1] >= held[-1]  # on from exactly where node A stopped
        moved = wait_for("the counter to go on", lambda: (n := counts(cri, cid)) and n[-1] > now[-1] + 1 and n)
        assert moved == list(range(len(moved)))
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    assert generations(stores["b"], "trainer")[0] == 1  # downloaded, then node B's own stop checkpoints follow


def test_kill_9_with_periodic_checkpoints_the_replacement_continues_from_the_last_generation(
        kyb_factory, gpu: GpuNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store, registry = tmp_path / "store", tmp_path / "registry.db"
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml(),
                    env={"KYBERNATE_STORE": str(store), "KYBERNATE_REGISTRY": str(registry)})
    gpu.restart_hookd(store_flags(c, store, registry))
    notes = {KEY: "periodic", EVERY: "1s", KEEP: "2", RESUME: "latest"}
    env = gpu_env(gpu, "p-periodic")
    with c.cri() as cri:
        pod, cid = start_pod(cri, "periodic-a", notes, env)
        # Generations come every period; the key keeps two (the shim's retention after each).
        wait_for("three periodic checkpoints, two kept",
                 lambda: (g := generations(store, "periodic")) and g[-1] >= 3 and len(g) == 2, 60)
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING  # leave-running: it ran on
        # kill -9 of the container's process, as a node failure would end it: no stop, no checkpoint-on-stop.
        wait_for("no checkpoint in flight", lambda: not in_flight(store, "periodic"), 30)
        os.kill(task_pid(c, cid), signal.SIGKILL)
        wait_for("the container to exit", lambda: cri.container_status(cid).state == pb.CONTAINER_EXITED, 30)
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    wait_for("no checkpoint in flight", lambda: not in_flight(store, "periodic"), 60)
    newest = generations(store, "periodic")[-1]
    held = stored_counts(store, "periodic", newest)
    log = c.log_text()
    pauses = re.findall(r'periodic checkpoint stored.*?pause_s=([\d.]+)', log)
    assert len(pauses) >= 3 and all(float(p) > 0 for p in pauses), pauses
    print(f"periodic checkpoints: pause_s {', '.join(pauses)}")  # the pause each cost (pytest -s shows it)
    with c.cri() as cri:
        pod, cid = start_pod(cri, "periodic-b", {**notes, EVERY: "1h"}, env)
        now = counts(cri, cid)
        assert now[:len(held)] == held and now[-1] >= held[-1]  # from the newest generation, nothing older
        restore, unlock = gpu.events("p-periodic")[-2:]
        assert (restore.op, unlock.op) == ("restore", "unlock") and restore.result == "CUDA_SUCCESS"
        moved = wait_for("the counter to go on", lambda: (n := counts(cri, cid)) and n[-1] > now[-1] + 1 and n)
        assert moved == list(range(len(moved)))
        cri.stop_pod(pod)
        cri.remove_pod(pod)


def task_pid(c, cid: str) -> int:  # type: ignore[no-untyped-def]
    """The host pid of the container's init process, from containerd's task list."""
    for line in c.ctr("task", "ls", namespace=CRI_NAMESPACE).stdout.splitlines()[1:]:
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise AssertionError(f"no task {cid}")


@pytest.mark.parametrize("version", ["2.1"])
def test_a_checkpoint_on_stop_past_its_budget_lets_the_stop_complete_and_leaves_nothing(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:  # noqa: F811
    store, registry = tmp_path / "store", tmp_path / "registry.db"
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml(),
                    env={"KYBERNATE_STORE": str(store), "KYBERNATE_REGISTRY": str(registry)})
    gpu.restart_hookd(store_flags(c, store, registry))
    gpu.node.set_faults(["checkpoint delay 8000 proc=p-slow"])  # the GPU checkpoint takes 8 s
    notes = {KEY: "slow", ON_STOP: "true", ON_STOP_TIMEOUT: "2s"}
    with c.cri() as cri:
        pod, cid = start_pod(cri, "slow", notes, gpu_env(gpu, "p-slow"))
        wait_for("the counter", lambda: len(counts(cri, cid)) > 3)
        began = time.monotonic()
        cri.stop_container(cid, grace_s=5)
        stop_s = time.monotonic() - began
        assert cri.container_status(cid).state == pb.CONTAINER_EXITED
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    # At most the budget (2 s), then the grace period (5 s) that the forwarded SIGTERM or, failing that, the
    # kubelet's SIGKILL ends, and no more: the 8 s GPU checkpoint did not hold the stop up.
    assert stop_s < 2 + 5 + 3, stop_s
    print(f"StopContainer past the checkpoint's budget (2 s) with grace 5 s: {stop_s:.2f} s")
    log = c.log_text()
    assert "checkpoint-on-stop did not finish within its budget; nothing of it is kept and the stop goes on" in log
    # Nothing incomplete is visible: no generation, and hookd's rollback removes its temp dir.
    wait_for("hookd's rollback", lambda: not in_flight(store, "slow"), 60)
    assert generations(store, "slow") == []


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_ctr_kill_sigterm_checkpoints_on_stop_and_ctr_run_resumes(kyb_factory, gpu: GpuNode, tmp_path: Path,  # noqa: F811
                                                                  version: str) -> None:
    """The GPU machine's path (tests/gpu scenario resilience): `ctr run --annotation`, `ctr task kill -s SIGTERM`
    through the shim, a new container resumed with `ctr run` and resume: latest."""
    store, registry = tmp_path / "store", tmp_path / "registry.db"
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml(),
                    env={"KYBERNATE_STORE": str(store), "KYBERNATE_REGISTRY": str(registry)})
    gpu.restart_hookd(store_flags(c, store, registry))
    notes = [arg for k, v in {KEY: "ctr-job", ON_STOP: "true", ON_STOP_TIMEOUT: "30s", RESUME: "latest"}.items()
             for arg in ("--annotation", f"{k}={v}")]
    runtime = "io.containerd.kybernate.v1"
    c.ctr("run", "-d", "--runtime", runtime, *notes, *gpu.container_env("p-ctr"), BUSYBOX_IMAGE, "job-1",
          "sh", "-c", COUNTER)
    first = wait_for("the counter", lambda: (n := read_counts(c, "job-1")) and len(n) > 5 and n)
    assert first[0] == 0
    c.ctr("task", "kill", "--signal", "SIGTERM", "job-1")  # returns once the dump has ended the task
    wait_for("the task to exit", lambda: task_status(c, "job-1") in ("STOPPED", None), 30)
    wait_for("the generation", lambda: generations(store, "ctr-job") == [1] and not in_flight(store, "ctr-job"), 30)
    held = stored_counts(store, "ctr-job", 1)
    assert [e.op for e in gpu.events("p-ctr")] == ["lock", "checkpoint"]
    c.ctr("task", "delete", "job-1")
    c.ctr("container", "delete", "job-1")
    c.ctr("run", "-d", "--runtime", runtime, *notes, *gpu.container_env("p-ctr"), BUSYBOX_IMAGE, "job-2",
          "sh", "-c", COUNTER)
    now = read_counts(c, "job-2")
    assert now[:len(held)] == held  # resumed from the stop's checkpoint: nothing lost
    assert [e.op for e in gpu.events("p-ctr")][-2:] == ["restore", "unlock"]
    wait_for("the counter to go on", lambda: read_counts(c, "job-2")[-1] > now[-1] + 1)
    c.ctr("task", "kill", "--signal", "SIGKILL", "job-2")
    wait_for("job-2 to exit", lambda: task_status(c, "job-2") in ("STOPPED", None), 30)
    assert generations(store, "ctr-job") == [1]  # SIGKILL: no checkpoint


def task_status(c, name: str) -> str | None:  # type: ignore[no-untyped-def]
    for line in c.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[2]
    return None
