"""The kybernate runtime through CRI, as the kubelet drives it: RuntimeClass handler `kybernate`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import RUNC_SHIM_BINARY, SHIM_BINARY, mounts_under, shim_pids
from harness.containerd import Containerd
from harness.cri import pb
from harness.images import BUSYBOX_IMAGE
from harness.workload import wait_for

pytestmark = pytest.mark.stack


def test_pod_with_two_containers_is_served_by_one_kybernate_shim(kyb: Containerd) -> None:
    with kyb.cri() as cri:
        config = cri.pod_config("two", annotations={"kybernate.io/lock-timeout-ms": "5000"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        assert cri.pod_status(pod).state == pb.SANDBOX_READY
        ids = [
            cri.create_container(pod, config, name, BUSYBOX_IMAGE, command=["sh", "-c", f"echo {name} > /who; sleep 3600"])
            for name in ("first", "second")
        ]
        for cid in ids:
            cri.start_container(cid)
        for cid, name in zip(ids, ("first", "second")):
            assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
            assert wait_for(f"{name} to write", lambda: cri.exec_sync(cid, ["cat", "/who"]).stdout) == f"{name}\n".encode()

        # Sandbox and both containers: one kybernate daemon, one runc shim behind it.
        assert len(shim_pids(kyb, SHIM_BINARY)) == 1
        assert len(shim_pids(kyb, RUNC_SHIM_BINARY)) == 1

        for cid in ids:
            cri.stop_container(cid, grace_s=0)
            assert cri.container_status(cid).state == pb.CONTAINER_EXITED
            cri.remove_container(cid)
        cri.stop_pod(pod)
        cri.remove_pod(pod)
        assert pod not in [p.id for p in cri.list_pods()]

    wait_for("the shims to exit", lambda: not shim_pids(kyb, SHIM_BINARY)
             and not shim_pids(kyb, RUNC_SHIM_BINARY))
    assert mounts_under(str(kyb.state)) == []


def test_bad_runtime_options_fail_the_pod_with_a_clear_error(kyb_factory) -> None:
    c = kyb_factory("2.1", runtime_toml='Bogus = "x"\n')
    with c.cri() as cri:
        config = cri.pod_config("bad")
        with pytest.raises(Exception) as failure:
            cri.run_pod(config, runtime_handler="kybernate")
        assert "unknown key 'Bogus'" in str(failure.value)
        assert cri.list_pods() == [] or all(p.state != pb.SANDBOX_READY for p in cri.list_pods())
    assert shim_pids(c, SHIM_BINARY) == []
    assert shim_pids(c, RUNC_SHIM_BINARY) == []


def test_recursive_read_only_mount_works_under_kybernate_as_under_runc_on_2_1(
    kyb_factory, tmp_path: Path
) -> None:
    """containerd 2.x sees runc's features through our shim (issue 15): the sub-mount is read-only too."""
    c = kyb_factory("2.1")
    host = tmp_path / "shared"
    (host / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "kyb-rro", str(host / "sub")], check=True)
    try:
        with c.cri() as cri:
            features = cri.handler_features()
            assert features["kybernate"].recursive_read_only_mounts
            assert features["kybernate"] == features["runc"]
            outcomes = {}
            for handler in ("runc", "kybernate"):
                config = cri.pod_config(f"rro-{handler}")
                pod = cri.run_pod(config, runtime_handler=handler)
                mount = pb.Mount(container_path="/data", host_path=str(host), readonly=True,
                                 recursive_read_only=True, propagation=pb.PROPAGATION_PRIVATE)
                cid = cri.create_container(pod, config, "main", BUSYBOX_IMAGE, command=["sleep", "3600"],
                                           mounts=[mount])
                cri.start_container(cid)
                probe = ("touch /data/top 2>/dev/null && echo top-rw || echo top-ro; "
                         "touch /data/sub/x 2>/dev/null && echo sub-rw || echo sub-ro")
                outcomes[handler] = cri.exec_sync(cid, ["sh", "-c", probe]).stdout.decode().split()
                cri.stop_pod(pod)
                cri.remove_pod(pod)
            assert outcomes["runc"] == ["top-ro", "sub-ro"]
            assert outcomes["kybernate"] == outcomes["runc"]
        assert c.running(), "containerd died"
        assert "panic" not in c.log_text()
    finally:
        subprocess.run(["umount", str(host / "sub")], check=False)
