"""GPU state through the store (fake CUDA driver, real hookd, containerd 1.6.20 and 2.1.x): `kybernate
checkpoint` runs the GPU steps in the usual order (lock and checkpoint before the freeze and the dump),
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
from test_gpu_steps import COUNTER, G0, GiB, GpuNode, gpu  # noqa: F401  (gpu: the fixture)

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
    env = {"NVIDIA_VISIBLE_DEVICES": "all", **gpu.node.env, **gpu.node.process_env("p-store", G0, 2 * GiB)}
    with c.cri() as cri:
        config = cri.pod_config("a")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "trainer", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER], env=env)
        cri.start_container(cid)
        wait_for("the counter", lambda: len(cri.exec_sync(cid, ["cat", "/count"]).stdout.split()) > 3)
        done = subprocess.run(
            [sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", "checkpoint", cid, "--key", "gpu",
             "--store", str(store), "--address", str(c.address), "--namespace", CRI_NAMESPACE, "--json"],
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
