import pytest

from kybernate.shim import manager
from kybernate.shim.manager import ChildShim, StartError


def test_child_start_output_of_both_runc_shim_generations():
    assert manager.parse_child_start_output(b"unix:///run/containerd/s/abc") == ChildShim("unix:///run/containerd/s/abc", 2)
    assert manager.parse_child_start_output(
        b'{"version":3,"address":"unix:///run/containerd/s/def","protocol":"ttrpc"}'
    ) == ChildShim("unix:///run/containerd/s/def", 3)


@pytest.mark.parametrize("output", [b"", b"panic: oops", b'{"version":3}', b"unix:///a\nunix:///b"])
def test_unreadable_child_output_is_a_clear_start_error(output):
    with pytest.raises(StartError):
        manager.parse_child_start_output(output)


def test_containers_group_like_the_runc_shim():
    assert manager.group_id({}, "c1") == "c1"
    assert manager.group_id({"annotations": {"io.kubernetes.cri.sandbox-id": "pod"}}, "c1") == "pod"
    assert manager.group_id(
        {"annotations": {"io.kubernetes.cri.sandbox-id": "pod", "io.containerd.runc.v2.group": "g"}}, "c1"
    ) == "g"


def test_our_socket_never_collides_with_the_runc_shims():
    ours = manager.socket_address("/run/containerd/containerd.sock", "k8s.io", "pod")
    assert ours.startswith("unix:///run/containerd/s/")
    assert ours == manager.socket_address("/run/containerd/containerd.sock", "k8s.io", "pod")
    assert ours != manager.socket_address("/run/containerd/containerd.sock", "default", "pod")
    # The runc shim hashes "<address>/<namespace>/<group>"; ours adds a suffix.
    import hashlib

    runc = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod").hexdigest()
    assert not ours.endswith(runc)


def test_bad_spec_is_a_clear_error(tmp_path):
    with pytest.raises(StartError, match="cannot read the OCI spec"):
        manager.read_spec(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(StartError, match="not valid JSON"):
        manager.read_spec(tmp_path)


def test_the_daemon_is_handed_the_runc_shim_through_a_pipe():
    import asyncio
    import os

    from kybernate.shim import daemon

    readable, writable = os.pipe()
    manager.hand_over(writable, manager.ChildShim("unix:///run/containerd/s/abc", 3))
    os.close(writable)
    assert asyncio.run(daemon._handed_over(readable)) == ("unix:///run/containerd/s/abc", 3)


@pytest.mark.parametrize("message", [b"", b"2", b"x unix:///a", b"2 /not/an/address"])
def test_a_daemon_not_handed_a_runc_shim_exits_without_touching_anything(message):
    # EOF (the start failed, or the process that forked it died) or garbage: NotHandedOver, which
    # run_handed_over answers by exiting without removing the socket or group state `start` owns.
    import asyncio
    import os

    from kybernate.shim import daemon

    readable, writable = os.pipe()
    os.write(writable, message)
    os.close(writable)
    with pytest.raises(daemon.NotHandedOver):
        asyncio.run(daemon._handed_over(readable))
