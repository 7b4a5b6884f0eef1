"""Restore into a new pod from a CRI checkpoint archive named by `kybernate.io/restore-from`,
as the kubelet drives it: no containerd patch, containerd 1.6.20 and 2.1.9 alike."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest
from harness.containerd import Containerd
from harness.cri import pb
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, wait_for

pytestmark = pytest.mark.stack
ANNOTATION = "kybernate.io/restore-from"
# The container changes its rootfs before counting: one file made, one deleted (a whiteout in the diff).
WORKLOAD = "rm /etc/group; echo hi > /made; " + COUNTER


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    d = tmp_path / "checkpoints"
    d.mkdir()
    return d


def runtime_toml(checkpoints: Path) -> str:
    return f'[kybernate]\ncheckpoint_dir = "{checkpoints}"\n'


def counts(cri, cid: str) -> list[int]:
    return [int(x) for x in cri.exec_sync(cid, ["cat", "/count"]).stdout.split()]


def checkpoint_a_counter(c: Containerd, archive: Path) -> int:
    """Pod A runs a counter under kybernate; CRI checkpoints it into `archive`; pod A is removed."""
    with c.cri() as cri:
        config = cri.pod_config("a")
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", WORKLOAD])
        cri.start_container(cid)
        # Long enough that a container started afresh could not catch up before the first read.
        wait_for("the counter", lambda: len(counts(cri, cid)) > 15)
        cri.checkpoint_container(cid, archive)
        last = counts(cri, cid)[-1]
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    return last


@pytest.mark.parametrize("target", ["1.6", "2.1"])
def test_a_new_pod_carries_on_from_the_archive(kyb_factory, stack, checkpoints: Path, target: str) -> None:
    # The archive is written by containerd 2.1 (1.6 has no CRI checkpoint) and restored by a second
    # containerd, as on another node.
    source = kyb_factory("2.1", runtime_toml=runtime_toml(checkpoints))
    before = checkpoint_a_counter(source, checkpoints / "counter.tar")
    with tarfile.open(checkpoints / "counter.tar") as tar:
        assert "checkpoint/inventory.img" in tar.getnames()
    shown = subprocess.run([str(stack.checkpointctl), "show", str(checkpoints / "counter.tar")],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "counter" in shown.stdout, shown.stderr

    node_b = kyb_factory(target, runtime_toml=runtime_toml(checkpoints))
    with node_b.cri() as cri:
        config = cri.pod_config("b", annotations={ANNOTATION: "counter.tar"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", WORKLOAD])
        cri.start_container(cid)
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
        # The rootfs changes came along: the made file is there, the deleted one is gone.
        assert cri.exec_sync(cid, ["cat", "/made"]).stdout == b"hi\n"
        assert cri.exec_sync(cid, ["ls", "/etc/group"]).exit_code != 0
        # Read at once: a fresh start would show a handful of lines, a restore at least A's.
        assert counts(cri, cid)[-1] >= before
        restored = wait_for("the restored counter to move on",
                            lambda: (n := counts(cri, cid)) and n[-1] > before + 1 and n)
        # Memory and files came from pod A: one unbroken run from 0, past where A was.
        assert restored == list(range(len(restored)))
        # The new pod has its own network: a new IP from this node's subnet.
        assert cri.pod_status(pod).network.ip


def test_only_the_archived_container_of_a_pod_restores(kyb_factory, checkpoints: Path) -> None:
    c = kyb_factory("2.1", runtime_toml=runtime_toml(checkpoints))
    before = checkpoint_a_counter(c, checkpoints / "counter.tar")
    with c.cri() as cri:
        config = cri.pod_config("two", annotations={ANNOTATION: "counter.tar"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        counter = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER])
        sidecar = cri.create_container(pod, config, "sidecar", BUSYBOX_IMAGE,
                                       command=["sh", "-c", "echo fresh > /state; sleep 600"])
        cri.start_container(counter)
        cri.start_container(sidecar)
        assert counts(cri, counter)[-1] >= before  # restored
        # The sidecar started from its image: no /count from the archive, its own file written.
        assert wait_for("the sidecar", lambda: cri.exec_sync(sidecar, ["cat", "/state"]).stdout) == b"fresh\n"
        assert cri.exec_sync(sidecar, ["ls", "/count"]).exit_code != 0


@pytest.mark.parametrize(
    "reference, prepare, message",
    [
        ("missing.tar", None, "no checkpoint archive"),
        ("../outside.tar", "outside", "outside the checkpoint directory"),
        ("corrupt.tar", "corrupt", "cannot read checkpoint archive"),
        ("foreign.tar", "foreign", "not a container checkpoint archive"),
    ],
)
def test_a_bad_reference_fails_that_container_only(kyb_factory, checkpoints: Path, reference, prepare, message) -> None:
    if prepare == "outside":
        with tarfile.open(checkpoints.parent / "outside.tar", "w"):
            pass
    elif prepare == "corrupt":
        (checkpoints / "corrupt.tar").write_bytes(b"\x00not a tar" * 100)
    elif prepare == "foreign":
        payload = checkpoints / "hello.txt"
        payload.write_text("hello")
        with tarfile.open(checkpoints / "foreign.tar", "w") as tar:
            tar.add(payload, arcname="hello.txt")
    c = kyb_factory("2.1", runtime_toml=runtime_toml(checkpoints))
    with c.cri() as cri:
        config = cri.pod_config("bad", annotations={ANNOTATION: reference})
        pod = cri.run_pod(config, runtime_handler="kybernate")  # the sandbox is not restored: unaffected
        with pytest.raises(Exception) as failure:
            cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER])
            cri.start_container(cid)
        assert message in str(failure.value), str(failure.value)
        assert cri.pod_status(pod).state == pb.SANDBOX_READY
        assert all(ct.state != pb.CONTAINER_RUNNING for ct in cri.list_containers(pod))


@pytest.mark.parametrize("version", ["1.6", "2.1"])
@pytest.mark.parametrize(
    "value, message",
    [
        # Before the bound: os.path.realpath of this took ~80 s on the shim's event loop.
        ("a/" * 500_000, "value of 1000000 bytes is longer than the limit of 1024 bytes"),
        # Before: "internal error" (realpath's ValueError escaped unmapped).
        ("counter\0.tar", "control character '\\x00'"),
    ],
    ids=["1MB", "NUL"],
)
def test_an_unbounded_annotation_is_refused_before_any_filesystem_call(kyb_factory, checkpoints: Path, version: str,
                                                                        value: str, message: str) -> None:
    import grpc

    c = kyb_factory(version, runtime_toml=runtime_toml(checkpoints))
    with c.cri() as cri:
        config = cri.pod_config("unbounded", annotations={ANNOTATION: value})
        # Pod annotations reach the sandbox too: the pod itself is refused, with the annotation named.
        with pytest.raises(grpc.RpcError) as failure:
            cri.run_pod(config, runtime_handler="kybernate")
        text = str(failure.value.details())
        assert f"annotation {ANNOTATION}" in text and message in text, text
        assert "internal error" not in text
        assert all(p.state != pb.SANDBOX_READY for p in cri.list_pods())
        # The node's shim machinery is unharmed: a plain pod on the same runtime comes up at once.
        ok = cri.run_pod(cri.pod_config("fine"), runtime_handler="kybernate")
        assert cri.pod_status(ok).state == pb.SANDBOX_READY
