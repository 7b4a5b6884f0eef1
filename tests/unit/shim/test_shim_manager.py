from pathlib import Path

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


@pytest.mark.parametrize("in_worker", [False, True], ids=["forked-daemon", "kybernate-shimd-worker"])
def test_a_failed_runc_shim_start_leaves_nothing_behind(tmp_path, monkeypatch, in_worker):
    """Our socket is bound (and, without kybernate-shimd, the daemon forked) before the runc shim starts: when
    that start fails, `start` says why and removes its socket, no group state is left, the forked daemon exits
    without a word, and a worker has no daemon to carry on as."""
    import os
    import time

    from kybernate.shim.cli import ShimArgs

    fake = tmp_path / "containerd-shim-runc-v2"
    fake.write_text("#!/bin/sh\ncat >/dev/null\necho 'boom: no runc here' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("KYBERNATE_RUNC_SHIM", str(fake))
    monkeypatch.setenv("KYBERNATE_CONFIG", str(tmp_path / "no-runtime.toml"))
    import tempfile

    sockets = Path(tempfile.mkdtemp(prefix="kyb-", dir="/tmp"))  # a socket path must fit in 108 bytes
    monkeypatch.setattr(manager, "SOCKET_DIR", str(sockets))
    monkeypatch.setattr(manager, "GROUP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(manager, "DAEMON_IN_THIS_PROCESS", in_worker)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    args = ShimArgs(namespace="ns", address="/run/containerd/containerd.sock.ttrpc", id="c1", bundle=str(bundle))
    with pytest.raises(StartError, match=r"start failed \(exit 3\): boom: no runc here"):
        manager.start(args, b"")
    assert list(sockets.iterdir()) == []
    sockets.rmdir()
    assert not (tmp_path / "state").exists() or list((tmp_path / "state").iterdir()) == []
    assert not (bundle / "address").exists()
    assert manager.run_pending_daemon() == 0  # nothing to carry on as
    if not in_worker:
        deadline = time.monotonic() + 30
        while True:  # the daemon forked for it: it read EOF and exited (status 1), touching nothing
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                assert os.waitstatus_to_exitcode(status) == 1
                break
            assert time.monotonic() < deadline, "the forked daemon did not exit"
            time.sleep(0.01)
