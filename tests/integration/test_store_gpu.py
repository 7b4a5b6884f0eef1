"""GPU state through the store (fake CUDA driver, real hookd, containerd 1.6.20 and 2.1.x): `kybernate
checkpoint` (hookd's Store.Checkpoint) runs the GPU steps in the usual order (lock and checkpoint before the freeze and the dump),
the GPU manifest lands in the generation, and a new pod restored from `store:<key>` gets its GPU state
back (restore + unlock after runc restored the process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness.containerd import CRI_NAMESPACE
from harness.images import BUSYBOX_IMAGE
from harness.workload import wait_for
from conftest import store_flags
from test_gpu_steps import COUNTER, G0, G1, GiB, GpuNode, gpu  # noqa: F401  (gpu: the fixture)

from kybernate.hooks.api import store as store_layout

pytestmark = pytest.mark.stack


def count(cri, cid: str) -> int:
    return int(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()[-1])


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_gpu_state_goes_through_the_store_into_a_new_pod(kyb_factory, gpu: GpuNode, tmp_path: Path,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(tmp_path / "registry.db"))
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml(), env={"KYBERNATE_STORE": str(store)})
    # The node's one hookd runs the GPU steps for the shim and owns the store: it needs containerd's address.
    gpu.restart_hookd(store_flags(c, store, tmp_path / "registry.db"))
    env = {"NVIDIA_VISIBLE_DEVICES": "all", **gpu.node.env, **gpu.node.process_env("p-store", G0, 2 * GiB)}
    with c.cri() as cri:
        config = cri.pod_config("a")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        cri.start_container(cid)
        wait_for("the counter", lambda: len(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()) > 3)
        done = subprocess.run(
            [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "checkpoint", cid, "--key", "gpu",
             "--socket", gpu.socket, "--namespace", CRI_NAMESPACE, "--json"],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        # Lock and GPU checkpoint while the process was alive and not yet frozen; no restore: it exited.
        events = gpu.events("p-store")
        assert [e.op for e in events] == ["lock", "checkpoint"]
        assert all(e.alive and not e.frozen and e.result == "CUDA_SUCCESS" for e in events)
        assert gpu.node.state("p-store").get("state", "").upper() == "CHECKPOINTED"
        cri.stop_pod(pod)
        cri.remove_pod(pod)

    gen = store_layout.Store(str(store)).open("gpu")
    assert "checkpoint/kybernate.json" in {f.path for f in gen.manifest.files}
    assert gen.manifest.gpu == result["gpu"]
    assert gen.manifest.gpu["gpus"] == [G0] and gen.manifest.gpu["processes"] == 1
    assert gen.manifest.gpu["vram_bytes"] == 2 * GiB

    with c.cri() as cri:
        config = cri.pod_config("b", annotations={"kybernate.io/restore-from": "store:gpu"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        cri.start_container(cid)
        restore, unlock = gpu.events("p-store")[-2:]
        assert (restore.op, unlock.op) == ("restore", "unlock")
        assert restore.alive and not restore.frozen and restore.result == "CUDA_SUCCESS" and restore.gpu == G0
        assert gpu.node.state("p-store").get("state", "").upper() == "RUNNING"
        last = count(cri, cid)
        assert last > 3  # carried on from the checkpoint, not started afresh
        wait_for("the counter to go on", lambda: count(cri, cid) > last)


def test_past_its_deadline_a_checkpoint_is_rolled_back_and_one_runs_per_container(
        kyb_factory, gpu: GpuNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store = tmp_path / "store"
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml(), env={"KYBERNATE_STORE": str(store)})
    gpu.restart_hookd(store_flags(c, store, tmp_path / "registry.db"))
    gpu.node.set_faults(["checkpoint delay 3000 proc=p-late"])  # the GPU checkpoint (inside the pause) takes 3 s
    env = {"NVIDIA_VISIBLE_DEVICES": "all", **gpu.node.env, **gpu.node.process_env("p-late", G0, 2 * GiB)}

    def kybernate(*args: str) -> list[str]:
        return [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "checkpoint", *args,
                "--socket", gpu.socket, "--namespace", CRI_NAMESPACE]

    with c.cri() as cri:
        config = cri.pod_config("a")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        cri.start_container(cid)
        wait_for("the counter", lambda: len(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()) > 3)
        first = subprocess.Popen(kybernate(cid, "--key", "late", "--leave-running", "--timeout", "2"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for("the GPU lock of the first checkpoint", lambda: [e.op for e in gpu.events("p-late")] == ["lock"])
            # A second checkpoint of the same container while the first runs: refused, nothing touched.
            second = subprocess.run(kybernate(cid, "--key", "other"), capture_output=True, text=True, timeout=60)
            assert second.returncode == 1, second.stderr
            assert "already being checkpointed" in second.stderr and "[FAILED_PRECONDITION]" in second.stderr
            _, err = first.communicate(timeout=60)
        finally:
            first.kill()
        assert first.returncode == 1, err
        assert "[DEADLINE_EXCEEDED]" in err and "rolled back" in err and "runs on" in err, err
        # Rolled back: the GPU checkpoint the deadline cut short is undone by hookd once the driver call
        # returns (restore + unlock), the task runs, no temp dir is left.
        wait_for("the GPU rollback", lambda: [e.op for e in gpu.events("p-late")][-1:] == ["unlock"], 30)
        assert [e.op for e in gpu.events("p-late")] == ["lock", "checkpoint", "restore", "unlock"]
        assert gpu.node.state("p-late").get("state", "").upper() == "RUNNING"
        assert cri.container_status(cid).state == 1  # CONTAINER_RUNNING
        last = count(cri, cid)
        wait_for("the counter to go on", lambda: count(cri, cid) > last)
        assert not (store / "late").exists() or list((store / "late").iterdir()) == []
        assert not (store / "other").exists()
        cri.stop_pod(pod)
        cri.remove_pod(pod)


def test_restore_from_lands_on_the_new_containers_own_gpu(kyb_factory, gpu: GpuNode, tmp_path: Path,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: a pod checkpointed on G0 restored into a new pod whose device plugin gave it G1
    (NVIDIA_VISIBLE_DEVICES): the shim maps G0 -> G1 though this node has both, and hookd passes the driver
    that pair."""
    store = tmp_path / "store"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(tmp_path / "registry.db"))
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml(), env={"KYBERNATE_STORE": str(store)})
    gpu.restart_hookd(store_flags(c, store, tmp_path / "registry.db"))
    fake = {**gpu.node.env, **gpu.node.process_env("p-vis", G0, 2 * GiB)}
    with c.cri() as cri:
        config = cri.pod_config("a")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER],
                                   env={"NVIDIA_VISIBLE_DEVICES": G0, **fake})
        cri.start_container(cid)
        wait_for("the counter", lambda: len(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()) > 3)
        done = subprocess.run(
            [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "checkpoint", cid, "--key", "vis",
             "--socket", gpu.socket, "--namespace", CRI_NAMESPACE, "--json"],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert gpu.node.state("p-vis").get("state", "").upper() == "CHECKPOINTED"
        cri.stop_pod(pod)
        cri.remove_pod(pod)

    with c.cri() as cri:
        config = cri.pod_config("b", annotations={"kybernate.io/restore-from": "store:vis"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER],
                                   env={"NVIDIA_VISIBLE_DEVICES": G1, **fake})
        cri.start_container(cid)
        restore, unlock = gpu.events("p-vis")[-2:]
        assert (restore.op, unlock.op) == ("restore", "unlock")
        assert restore.result == "CUDA_SUCCESS" and (restore.pairs, restore.gpu) == (1, G1)
        assert gpu.node.state("p-vis").get("state", "").upper() == "RUNNING"
        last = count(cri, cid)
        wait_for("the counter to go on", lambda: count(cri, cid) > last)
