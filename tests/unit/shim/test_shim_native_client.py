"""The native shim client (shim/native/shim_client.c) against the Python reference, without containerd.

Built here from source with the system cc (as `make venv` and the installer build it). The Python code
(manager.group_id, socket_address, ShimArgs.child_flags) is the reference: for every spec the native client
either answers exactly as Python would, or hands the command to the Python path, never a third thing.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kybernate.shim import client, manager
from kybernate.shim.ttrpc.address import socket_path

ROOT = Path(__file__).resolve().parents[3]
SOURCE = ROOT / "shim" / "native" / "shim_client.c"
PYTHON_MARK = "python-path-ran"


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client built from source, with a stand-in Python launcher beside it that says it ran."""
    cc = shutil.which("cc")
    assert cc, "no C compiler (cc) on PATH: the native shim client needs one to build"
    d = tmp_path_factory.mktemp("native")
    binary = d / "containerd-shim-kybernate-v1"
    subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary), str(SOURCE)], check=True)
    fallback = Path(str(binary) + ".py")
    fallback.write_text(f"#!/bin/sh\necho '{PYTHON_MARK}' \"$@\"\nexit 7\n")
    fallback.chmod(0o755)
    return binary


@pytest.fixture
def listening() -> Iterator[list[socket.socket]]:
    """Sockets bound under containerd's socket dir by a test; closed and removed afterwards."""
    held: list[socket.socket] = []
    yield held
    for s in held:
        path = s.getsockname()
        s.close()
        if isinstance(path, str) and path:
            Path(path).unlink(missing_ok=True)


@pytest.fixture
def alive() -> Iterator[Callable[[str], None]]:
    """Hold a group's alive lock as its live daemon does (manager.hold_alive_lock); released and removed after."""
    held: list[tuple[int, str]] = []

    def hold(address: str) -> None:
        os.makedirs(manager.GROUP_STATE_DIR, exist_ok=True)
        path = manager.alive_path(address)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append((fd, path))

    yield hold
    for fd, path in held:
        os.close(fd)
        Path(path).unlink(missing_ok=True)


def listen_at(address: str, held: list[socket.socket]) -> None:
    os.makedirs(manager.SOCKET_DIR, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(socket_path(address))
    s.listen(16)
    held.append(s)


def bundle_with(tmp_path: Path, spec_text: str) -> Path:
    bundle = tmp_path / f"bundle-{secrets.token_hex(3)}"
    bundle.mkdir()
    (bundle / "config.json").write_bytes(spec_text.encode())
    return bundle


def run(binary: Path, args: list[str], bundle: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, client.SOCKET_ENV: "off", **env}
    return subprocess.run([str(binary), *args], cwd=bundle, env=environ, input="options", capture_output=True,
                          text=True, timeout=30)


def flags(containerd: str, cid: str = "c1", ns: str = "k8s.io") -> list[str]:
    return ["-namespace", ns, "-address", containerd, "-publish-binary", "/bin/containerd", "-id", cid]


SANDBOX = "a" * 64
SPECS: list[tuple[str, str]] = [
    # (name, config.json text); Python's group_id decides the expected group
    ("sandbox-id", json.dumps({"ociVersion": "1.2", "annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}})),
    ("runc-group-first",
     json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": "s", "io.containerd.runc.v2.group": "g"}})),
    ("empty-group-label",
     json.dumps({"annotations": {"io.containerd.runc.v2.group": "", "io.kubernetes.cri.sandbox-id": "s"}})),
    ("no-annotations", json.dumps({"process": {"args": ["sh", "-c", "echo \"}{\""]}, "root": {"path": "rootfs"}})),
    ("annotations-null", '{"annotations": null}'),
    ("annotations-list", '{"annotations": ["io.kubernetes.cri.sandbox-id"]}'),
    ("last-duplicate-wins", '{"annotations": {"io.kubernetes.cri.sandbox-id": "x"}, "annotations": {"a": "b"}}'),
    ("duplicate-label", '{"annotations": {"io.kubernetes.cri.sandbox-id": "x", "io.kubernetes.cri.sandbox-id": "y"}}'),
    ("escapes", '{"annotations": {"io.kubernetes.cri.sandbox-id": "p\\u00e9\\ud83d\\ude00\\n\\"q\\u003c"}}'),
    ("escaped-key", '{"annot\\u0061tions": {"io.kubernetes.cri\\u002esandbox-id": "k"}}'),
    ("utf8-elsewhere",
     json.dumps({"env": ["X=é€"], "annotations": {"io.kubernetes.cri.sandbox-id": "u"}}, ensure_ascii=False)),
    ("nested-deep", json.dumps({"linux": {"a": [[[{"b": [1.5e3, -0, True, False, None]}]]]},
                                "annotations": {"other": {"x": 1}, "io.kubernetes.cri.sandbox-id": "n"}})),
    ("long-other-key", json.dumps({"annotations": {"k" * 200: "v", "io.kubernetes.cri.sandbox-id": "l"}})),
]
# What the native client must leave to Python (Python answers, or fails, its own way).
DECLINED: list[tuple[str, str]] = [
    ("not-json", "{"),
    ("not-an-object", "[]"),
    ("trailing-data", '{"annotations": {}} x'),
    ("non-string-label", '{"annotations": {"io.kubernetes.cri.sandbox-id": 5}}'),
    ("nan", '{"a": NaN, "annotations": {"io.kubernetes.cri.sandbox-id": "s"}}'),
    ("lone-surrogate", '{"annotations": {"io.kubernetes.cri.sandbox-id": "\\ud800"}}'),
    ("bad-utf8", '{"x": "\xff"}'),
    ("control-char", '{"annotations": {"io.kubernetes.cri.sandbox-id": "a\tb"}}'),
]


@pytest.mark.parametrize("name,spec_text", SPECS, ids=[s[0] for s in SPECS])
def test_start_joins_the_daemon_python_would_name(native: Path, tmp_path: Path, listening: list[socket.socket],
                                                  alive: Callable[[str], None], name: str, spec_text: str) -> None:
    containerd = f"/run/test-{secrets.token_hex(4)}/containerd.sock"
    bundle = bundle_with(tmp_path, spec_text)
    expected = manager.socket_address(containerd, "k8s.io", manager.group_id(manager.read_spec(str(bundle)), "c1"))
    listen_at(expected, listening)
    alive(expected)
    done = run(native, [*flags(containerd), "start"], bundle)
    assert (done.returncode, done.stdout, done.stderr) == (0, expected, "")
    assert (bundle / "address").read_text() == expected
    assert not (bundle / ".address.kybernate").exists()
    # It asked the kernel (the daemon's lock), not the daemon: nothing connected to the daemon's socket.
    listening[-1].setblocking(False)
    with pytest.raises(BlockingIOError):
        listening[-1].accept()


def test_start_without_a_live_daemon_goes_to_the_python_path(native: Path, tmp_path: Path,
                                                              listening: list[socket.socket],
                                                              alive: Callable[[str], None]) -> None:
    spec = json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}})
    # A socket still listening but nobody holds the alive lock: its daemon died (or exited) and the socket lingers.
    containerd = f"/run/test-{secrets.token_hex(4)}/containerd.sock"
    listen_at(manager.socket_address(containerd, "k8s.io", SANDBOX), listening)
    done = run(native, [*flags(containerd), "start"], bundle_with(tmp_path, spec))
    assert done.returncode == 7 and done.stdout.startswith(PYTHON_MARK)
    # The lock held but the socket gone (removed under a live daemon): no address to give containerd.
    containerd = f"/run/test-{secrets.token_hex(4)}/containerd.sock"
    alive(manager.socket_address(containerd, "k8s.io", SANDBOX))
    done = run(native, [*flags(containerd), "start"], bundle_with(tmp_path, spec))
    assert done.returncode == 7 and done.stdout.startswith(PYTHON_MARK)


@pytest.mark.parametrize("name,spec_text", DECLINED, ids=[s[0] for s in DECLINED])
def test_specs_it_cannot_read_exactly_go_to_the_python_path(native: Path, tmp_path: Path, name: str,
                                                            spec_text: str) -> None:
    bundle = tmp_path / f"bundle-{name}"
    bundle.mkdir()
    (bundle / "config.json").write_bytes(spec_text.encode("latin-1"))
    done = run(native, [*flags("/run/x.sock"), "start"], bundle)
    assert done.returncode == 7 and done.stdout.startswith(PYTHON_MARK)
    assert not (bundle / "address").exists()


def test_the_first_container_of_a_pod_goes_to_the_python_path_with_its_arguments(native: Path, tmp_path: Path) -> None:
    bundle = bundle_with(tmp_path, json.dumps({"annotations": {}}))
    done = run(native, [*flags("/run/nobody.sock"), "start"], bundle)  # no daemon listens: a new pod
    assert done.returncode == 7
    assert done.stdout.split() == [PYTHON_MARK, *flags("/run/nobody.sock"), "start"]


@pytest.mark.parametrize("args", [["-v"], ["-info"], ["-namespace", "n", "bogus"], ["-id", "x", "start"],
                                  ["-namespace", "n", "-unknown", "start"], ["-namespace", "n", "start", "extra"]])
def test_everything_else_goes_to_the_python_path(native: Path, tmp_path: Path, args: list[str]) -> None:
    done = run(native, args, tmp_path)
    assert done.returncode == 7 and done.stdout.split() == [PYTHON_MARK, *args]


def resident_listens(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
            return True
        except OSError:
            return False


def fake_runc_shim(tmp_path: Path) -> Path:
    fake = tmp_path / "containerd-shim-runc-v2"
    fake.write_text('#!/bin/sh\necho "cwd=$(pwd)"\necho "args=$*"\nexit 3\n')
    fake.chmod(0o755)
    return fake


def answer_one_ping(listener: socket.socket, answer: bool) -> threading.Thread:
    """A pod daemon's socket that answers one ttrpc request (as any live daemon does), or a dying one
    that accepts and closes (its listener outlived its connections)."""

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            head = conn.recv(10)
            length, stream = struct.unpack(">II", head[:8])
            conn.recv(length)
            if answer:
                conn.sendall(struct.pack(">IIBB", 0, stream, 2, 0))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_delete_with_the_daemon_answering_runs_the_runc_shims_delete_with_pythons_flags(
    native: Path, tmp_path: Path, listening: list[socket.socket]
) -> None:
    containerd = f"/run/test-{secrets.token_hex(4)}/containerd.sock"
    bundle = bundle_with(tmp_path, json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}}))
    listen_at(manager.socket_address(containerd, "k8s.io", SANDBOX), listening)
    answer_one_ping(listening[-1], answer=True)
    fake_runc_shim(tmp_path)  # found on PATH below
    args = ["-namespace", "k8s.io", "-address", containerd, "-publish-binary", "/bin/containerd", "-debug",
            "-id", "c1", "-bundle", str(bundle), "delete"]
    done = run(native, args, tmp_path, PATH=f"{tmp_path}:/usr/bin:/bin")
    expected = manager.ShimArgs(namespace="k8s.io", address=containerd, publish_binary="/bin/containerd", id="c1",
                                bundle=str(bundle), debug=True).child_flags()
    # Its exit status and output are the runc shim's own: exec, not a wrapper.
    assert done.returncode == 3
    assert done.stdout.splitlines() == [f"cwd={bundle}", "args=" + " ".join([*expected, "delete"])]


def test_delete_while_a_killed_daemons_listener_lingers_goes_to_the_python_path(
    native: Path, tmp_path: Path, listening: list[socket.socket]
) -> None:
    containerd = f"/run/test-{secrets.token_hex(4)}/containerd.sock"
    bundle = bundle_with(tmp_path, json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}}))
    listen_at(manager.socket_address(containerd, "k8s.io", SANDBOX), listening)
    answer_one_ping(listening[-1], answer=False)
    done = run(native, [*flags(containerd), "delete"], bundle, KYBERNATE_RUNC_SHIM=str(fake_runc_shim(tmp_path)))
    assert done.returncode == 7 and done.stdout.startswith(PYTHON_MARK)  # it finds and stops the orphan


def test_delete_after_a_clean_exit_skips_python_and_after_a_killed_daemon_does_not(
    native: Path, tmp_path: Path
) -> None:
    containerd = f"/run/test-{secrets.token_hex(4)}/containerd.sock"
    bundle = bundle_with(tmp_path, json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}}))
    address = manager.socket_address(containerd, "k8s.io", SANDBOX)
    state_dir = tmp_path / "state"
    env = {"KYBERNATE_RUNC_SHIM": str(fake_runc_shim(tmp_path)), "KYBERNATE_SHIM_STATE_DIR": str(state_dir)}
    clean = run(native, [*flags(containerd), "delete"], bundle, **env)
    assert clean.returncode == 3 and clean.stdout.startswith("cwd=")  # nothing of ours left: the runc shim's delete
    # A killed daemon leaves its group state: the orphaned runc shim is Python's to find and stop.
    state_dir.mkdir()
    (state_dir / (Path(socket_path(address)).name + ".json")).write_text("{}")
    orphan = run(native, [*flags(containerd), "delete"], bundle, **env)
    assert orphan.returncode == 7 and orphan.stdout.startswith(PYTHON_MARK)


def test_through_a_resident_the_worker_answers_on_the_callers_stdout(native: Path, tmp_path: Path) -> None:
    sock = tmp_path / "shimd.sock"
    env = {**os.environ, client.SOCKET_ENV: str(sock)}
    proc = subprocess.Popen([sys.executable, "-m", "kybernate.shim.resident"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not resident_listens(sock):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "kybernate-shimd did not listen"
            time.sleep(0.02)
        done = subprocess.run([str(native), "-v"], env=env, capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout) == (0, "containerd-shim-kybernate-v1:\n  Version:  0.1.0\n")
        bad = subprocess.run([str(native), "-namespace", "n", "bogus"], env=env, capture_output=True, text=True,
                             timeout=30)
        assert bad.returncode == 2 and "unknown action 'bogus'" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_delete_after_the_runc_shim_removed_our_socket_skips_python_only_if_its_child_is_gone(
    native: Path, tmp_path: Path, listening: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """containerd's Shutdown: the runc shim exits and removes the socket named in bundle/address (ours)
    before our daemon removes its group state. A child that still listens is an orphan for Python to stop."""
    containerd = f"/run/test-{secrets.token_hex(4)}/containerd.sock"
    bundle = bundle_with(tmp_path, json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}}))
    address = manager.socket_address(containerd, "k8s.io", SANDBOX)
    state_dir = tmp_path / "state"
    env = {"KYBERNATE_RUNC_SHIM": str(fake_runc_shim(tmp_path)), "KYBERNATE_SHIM_STATE_DIR": str(state_dir)}
    child = f"unix://{manager.SOCKET_DIR}/test-child-{secrets.token_hex(6)}"
    monkeypatch.setattr(manager, "GROUP_STATE_DIR", str(state_dir))
    manager.GroupState("k8s.io", SANDBOX, address, child, 3).save()
    listen_at(child, listening)  # the child runc shim still runs: Python finds and stops it
    alive = run(native, [*flags(containerd), "delete"], bundle, **env)
    assert alive.returncode == 7 and alive.stdout.startswith(PYTHON_MARK)
    listening.pop().close()  # the child exited
    Path(socket_path(child)).unlink()
    gone = run(native, [*flags(containerd), "delete"], bundle, **env)
    assert gone.returncode == 3 and gone.stdout.startswith("cwd=")
    assert manager.GroupState.load(address) is None  # removed, as stop_orphaned_child would


def test_delete_of_a_task_the_daemon_deleted_answers_like_the_runc_shim_without_running_it(
    native: Path, tmp_path: Path, listening: list[socket.socket]
) -> None:
    from kybernate.api import task_pb2
    from kybernate.shim.service import DELETED_MARK

    containerd = f"/run/test-{secrets.token_hex(4)}/containerd.sock"
    bundle = bundle_with(tmp_path, json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}}))
    (bundle / "init.pid").write_text("4242")
    (bundle / DELETED_MARK).touch()
    listen_at(manager.socket_address(containerd, "k8s.io", SANDBOX), listening)
    answer_one_ping(listening[-1], answer=True)
    before = time.time()
    done = subprocess.run([str(native), *flags(containerd), "delete"], cwd=bundle, capture_output=True, timeout=30,
                          env={**os.environ, client.SOCKET_ENV: "off",
                               "KYBERNATE_RUNC_SHIM": str(fake_runc_shim(tmp_path))})
    assert done.returncode == 0, done.stderr
    reply = task_pb2.DeleteResponse.FromString(done.stdout)  # not the fake runc shim's text: it did not run
    assert (reply.pid, reply.exit_status) == (4242, 137)
    assert before - 1 <= reply.exited_at.seconds + reply.exited_at.nanos / 1e9 <= time.time() + 1
