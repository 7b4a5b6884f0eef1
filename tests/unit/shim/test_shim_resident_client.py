"""The resident kybernate-shimd and its minimal client, without containerd (that is in tests/integration)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kybernate.shim import client, resident


def test_request_round_trips_argv_cwd_and_environment() -> None:
    argv = ["/bin/containerd-shim-kybernate-v1", "-namespace", "k8s.io", "-id", "a b,c:", "start"]
    env = {"PATH": "/bin", "EMPTY": "", "EQUALS": "x=y", "NL": "a\nb"}
    wire = client.encode(argv, "/run/x", env)
    assert int.from_bytes(wire[:8], "big") == len(wire) - 8
    assert client.decode(wire[8:]) == (argv, "/run/x", env)


@pytest.mark.parametrize("body", [
    b"", b"1:2,", b"1:1,1:/,1:0,", b"1:1,1:/,1:5,1:a,", b"9:1,", b"x:1,", b"1:1,1:/,1:1,1:a,3:KEY,",
])
def test_malformed_requests_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        client.decode(body)


def test_without_a_resident_process_nothing_is_sent(tmp_path: Path) -> None:
    assert client.ask_resident(str(tmp_path / "absent.sock"), ["shim", "-v"]) is None


def test_fallback_is_noted_once_per_absence(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    os.mkfifo(bundle / "log")
    reader = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    try:
        sock = str(tmp_path / "shimd.sock")
        for _ in range(3):
            client.note_fallback_once(sock, ["-namespace", "n", "-bundle", str(bundle), "start"])
        said = os.read(reader, 65536).decode()
    finally:
        os.close(reader)
    assert said.count("kybernate-shimd is not running") == 1
    assert Path(sock + client.FALLBACK_MARK_SUFFIX).exists()


def test_set_title_changes_what_proc_cmdline_shows() -> None:
    code = (
        "import sys; from kybernate.shim import title\n"
        "ok = title.set_title(['containerd-shim-kybernate-v1', '-id', 'x', 'start'])\n"
        "print(ok, open('/proc/self/cmdline','rb').read().rstrip(b'\\0').split(b'\\0'))\n"
        "print(title.set_title(['y' * (title.room() + 1)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *[""] * 100], capture_output=True, text=True, check=True).stdout
    first, second = out.splitlines()
    assert first == "True [b'containerd-shim-kybernate-v1', b'-id', b'x', b'start']"
    assert second == "False"  # too long for the room: left alone


def test_a_forked_child_sets_its_title_from_the_remembered_area() -> None:
    # kybernate-shimd remembers where argv lives before forking; its workers set their titles without /proc.
    code = (
        "import os, sys; from kybernate.shim import title\n"
        "title.remember_area()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    title.set_title(['containerd-shim-kybernate-v1', 'delete'])\n"
        "    sys.stdout.write(repr(open('/proc/self/cmdline','rb').read().rstrip(b'\\0').split(b'\\0')))\n"
        "    sys.stdout.flush(); os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *[""] * 100], capture_output=True, text=True, check=True).stdout
    assert out == "[b'containerd-shim-kybernate-v1', b'delete']"


def resident_listens(sock: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
            return True
        except OSError:
            return False


@pytest.fixture
def shimd(tmp_path: Path):
    sock = tmp_path / "shimd.sock"
    env = {**os.environ, client.SOCKET_ENV: str(sock)}
    proc = subprocess.Popen([sys.executable, "-m", "kybernate.shim.resident", "--log-level", "debug"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not resident_listens(sock):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "kybernate-shimd did not listen"
        time.sleep(0.02)
    yield sock, env, proc
    proc.terminate()
    proc.wait(10)


def test_a_command_runs_in_a_worker_and_answers_on_the_callers_stdout(shimd) -> None:
    sock, env, proc = shimd
    launcher = [sys.executable, "-m", "kybernate.shim.client"]
    done = subprocess.run([*launcher, "-v"], env=env, capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "containerd-shim-kybernate-v1:\n  Version:  0.1.0\n")
    bad = subprocess.run([*launcher, "-namespace", "n", "bogus"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown action 'bogus'" in bad.stderr and bad.stdout == ""
    assert not Path(str(sock) + client.FALLBACK_MARK_SUFFIX).exists()  # no fallback happened
    assert proc.poll() is None


def test_a_killed_resident_falls_back_and_a_new_one_clears_the_mark(shimd, tmp_path: Path) -> None:
    sock, env, proc = shimd
    proc.kill()
    proc.wait(10)
    launcher = [sys.executable, "-m", "kybernate.shim.client"]
    done = subprocess.run([*launcher, "-v"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Version" in done.stdout
    assert Path(str(sock) + client.FALLBACK_MARK_SUFFIX).exists()
    again = subprocess.Popen([sys.executable, "-m", "kybernate.shim.resident"], env=env,
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while Path(str(sock) + client.FALLBACK_MARK_SUFFIX).exists():  # removed once it listens again
            assert again.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        done = subprocess.run([*launcher, "-v"], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and not Path(str(sock) + client.FALLBACK_MARK_SUFFIX).exists()
    finally:
        again.terminate()
        again.wait(10)


def test_a_second_resident_on_the_same_socket_is_refused(shimd) -> None:
    sock, env, _ = shimd
    second = subprocess.run([sys.executable, "-m", "kybernate.shim.resident"], env=env, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert second.returncode == 1 and "already listens" in second.stderr


def test_a_client_of_garbage_costs_one_worker_and_nothing_else(shimd) -> None:
    import socket

    sock, env, proc = shimd
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"\x00" * 8 + b"nonsense")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(16) == b""  # closed without an answer
    done = subprocess.run([sys.executable, "-m", "kybernate.shim.client", "-v"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and proc.poll() is None


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def wait_until(what: str, condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def run_one_command_and_see_its_spare_replaced(resident_pid: int, env: dict[str, str]) -> None:
    """A command through the resident takes one spare (it exits once answered); one new spare takes its place."""
    before = children_of(resident_pid)
    done = subprocess.run([sys.executable, "-m", "kybernate.shim.client", "-v"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and "Version" in done.stdout
    wait_until("the used spare replaced", lambda: len(children_of(resident_pid)) == resident.SPARES
               and len(children_of(resident_pid) - before) == 1)


def test_spares_wait_ahead_serve_commands_and_go_with_the_resident(shimd) -> None:
    # Two idle workers are forked ahead; a command is handed to one (no fork on its path), the spare is
    # replaced right after the hand-off, and when the resident dies its spares see EOF and exit: they
    # hold nothing of it (its socket refuses connections once it is gone).
    sock, env, proc = shimd
    wait_until("two spares", lambda: len(children_of(proc.pid)) == resident.SPARES)
    run_one_command_and_see_its_spare_replaced(proc.pid, env)
    spares = children_of(proc.pid)
    proc.kill()
    proc.wait(10)
    wait_until("spares gone with the resident", lambda: not any(Path(f"/proc/{p}").exists() for p in spares))
    assert not resident_listens(sock)


def test_a_spare_handed_out_is_replaced_at_once_not_when_the_resident_is_next_quiet(tmp_path: Path) -> None:
    # With the quiet-time refill an hour away, only the refill at the hand-off can replace the spare: it
    # must not wait for a quiet moment, which on a busy node lands in the pod's next CRI call.
    sock = tmp_path / "shimd.sock"
    env = {**os.environ, client.SOCKET_ENV: str(sock)}
    code = ("import sys; from kybernate.shim import resident; resident.QUIET_S = 3600; "
            f"sys.exit(resident.main(['--socket', {str(sock)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until("kybernate-shimd to listen", lambda: resident_listens(sock) or proc.poll() is not None)
        wait_until("two spares, forked at the start", lambda: len(children_of(proc.pid)) == resident.SPARES)
        run_one_command_and_see_its_spare_replaced(proc.pid, env)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(10)


def test_without_spares_each_command_forks_its_worker(tmp_path: Path) -> None:
    sock = tmp_path / "shimd.sock"
    env = {**os.environ, client.SOCKET_ENV: str(sock)}
    proc = subprocess.Popen([sys.executable, "-m", "kybernate.shim.resident", "--spares", "0", "--max-workers", "1"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until("kybernate-shimd to listen", lambda: resident_listens(sock) or proc.poll() is not None)
        for _ in range(3):  # one at a time (max-workers 1), each in a worker forked for it
            done = subprocess.run([sys.executable, "-m", "kybernate.shim.client", "-v"], env=env,
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and "Version" in done.stdout
        wait_until("no worker left", lambda: not children_of(proc.pid))  # none forked ahead, all reaped
        assert not Path(str(sock) + client.FALLBACK_MARK_SUFFIX).exists()
    finally:
        proc.terminate()
        proc.wait(10)
