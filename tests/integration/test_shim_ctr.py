"""The kybernate runtime under real containerd 1.6.20 and 2.1.x through ctr: every containerd behaviour
stays exact because the shim forwards to the stock runc shim."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import RUNC_SHIM_BINARY, RUNTIME, SHIM_BINARY, mounts_under, processes, shim_pids
from harness.containerd import Containerd
from harness.images import BUSYBOX_IMAGE
from harness.workload import COUNTER, read_counts, task_status, wait_for

from kybernate.hooks.api import procfs
from kybernate.shim import manager

pytestmark = pytest.mark.stack


def run_d(c: Containerd, name: str, *cmd: str) -> None:
    c.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_IMAGE, name, *cmd)







def test_attached_run_passes_stdout_stderr_and_exit_code(kyb: Containerd) -> None:
    r = kyb.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX_IMAGE, "attached",
                "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")


def test_run_with_a_terminal(kyb: Containerd) -> None:
    ctr = " ".join([str(kyb.binaries.ctr), "--address", str(kyb.address), "-n", kyb.namespace, "run", "--rm", "-t",
                    "--runtime", RUNTIME, BUSYBOX_IMAGE, "tty", "sh", "-c", "'tty; exit 3'"])
    # `script` gives ctr the pseudo-terminal it insists on for -t.
    r = subprocess.run(["script", "-qec", ctr, "/dev/null"], capture_output=True, text=True, timeout=60,
                       env=kyb.env, stdin=subprocess.DEVNULL)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "/dev/pts/" in r.stdout


def test_detached_exec_pause_resume_kill_delete(kyb: Containerd) -> None:
    run_d(kyb, "d1", "sleep", "3600")
    assert task_status(kyb, "d1") == "RUNNING"
    r = kyb.ctr("tasks", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo inside; exit 5", check=False)
    assert (r.returncode, r.stdout) == (5, "inside\n")

    kyb.ctr("tasks", "pause", "d1")
    assert task_status(kyb, "d1") == "PAUSED"
    kyb.ctr("tasks", "resume", "d1")
    assert task_status(kyb, "d1") == "RUNNING"

    kyb.ctr("tasks", "kill", "-s", "SIGKILL", "d1")
    wait_for("the task to stop", lambda: task_status(kyb, "d1") == "STOPPED")
    kyb.ctr("tasks", "delete", "d1")
    kyb.ctr("containers", "delete", "d1")
    assert kyb.ctr("containers", "ls", "-q").stdout.split() == []
    wait_for("the shims to exit", lambda: not shim_pids(kyb, SHIM_BINARY)
             and not shim_pids(kyb, RUNC_SHIM_BINARY))


def test_checkpoint_leave_running_then_restore_continues_the_counter(kyb: Containerd) -> None:
    run_d(kyb, "cnt", "sh", "-c", COUNTER)
    wait_for("the counter to start", lambda: len(read_counts(kyb, "cnt")) > 3)
    kyb.ctr("containers", "checkpoint", "--task", "--rw", "cnt", "kyb.local/ckpt/cnt:1")
    # Leave-running: the task carries on after the checkpoint.
    after = read_counts(kyb, "cnt")[-1]
    wait_for("the counter to go on after the checkpoint", lambda: read_counts(kyb, "cnt")[-1] > after + 1)
    assert task_status(kyb, "cnt") == "RUNNING"

    at_checkpoint_or_later = read_counts(kyb, "cnt")[-1]
    kyb.ctr("tasks", "rm", "-f", "cnt")
    kyb.ctr("containers", "rm", "cnt")
    kyb.ctr("containers", "restore", "--live", "--rw", "cnt", "kyb.local/ckpt/cnt:1")
    assert task_status(kyb, "cnt") == "RUNNING"
    counts = wait_for("the restored counter to move on",
                      lambda: (c := read_counts(kyb, "cnt")) and c[-1] > at_checkpoint_or_later and c)
    # One unbroken run: restored from the checkpoint's memory and rootfs, not started afresh.
    assert counts == list(range(len(counts)))
    info = kyb.ctr("containers", "info", "cnt").stdout
    assert RUNTIME in info  # the restored container runs under kybernate too


def test_containerd_restart_reconnects_to_running_shims(kyb: Containerd) -> None:
    names = ["r1", "r2", "r3"]
    for name in names:
        run_d(kyb, name, "sleep", "3600")
    daemons = sorted(shim_pids(kyb, SHIM_BINARY))
    assert len(daemons) == 3

    kyb.restart()

    assert sorted(shim_pids(kyb, SHIM_BINARY)) == daemons  # the same shims, reconnected
    for name in names:
        assert task_status(kyb, name) == "RUNNING"
        r = kyb.ctr("tasks", "exec", "--exec-id", f"x{name}", name, "echo", name)
        assert r.stdout == f"{name}\n"
        kyb.ctr("tasks", "kill", "-s", "SIGKILL", name)
        wait_for(f"{name} to stop", lambda: task_status(kyb, name) == "STOPPED")
        kyb.ctr("tasks", "delete", name)


def test_killing_the_shim_daemon_cleans_up_like_a_runc_shim(kyb: Containerd) -> None:
    run_d(kyb, "victim", "sleep", "3600")
    [ours] = shim_pids(kyb, SHIM_BINARY)
    [child] = shim_pids(kyb, RUNC_SHIM_BINARY)
    address = manager.socket_address(str(kyb.address), kyb.namespace, "victim")
    state = manager.GroupState.load(address)
    assert state is not None and state.address == address
    workload = int(kyb.ctr("tasks", "ls").stdout.splitlines()[1].split()[1])
    table, by_pid = procfs.unix_sockets(), procfs.socket_inodes_by_pid()
    # The recorded child address is the one the runc shim we found listens on.
    assert manager.socket_path(state.child_address) in {table.get(i) for i in by_pid.get(child, ())}
    pair_sockets = {table[i] for pid in (ours, child) for i in by_pid.get(pid, ()) if table.get(i, "").startswith("/")}
    assert len(pair_sockets) >= 2  # ours, the runc shim's (and its debug socket when containerd logs at debug)

    os.kill(ours, signal.SIGKILL)

    wait_for("containerd to notice and clean up", lambda: task_status(kyb, "victim") in (None, "STOPPED"), 20)
    # The runc shim's own cleanup (runc delete, then unmount) runs inside containerd's: wait for all of it.
    wait_for("the runc shim, the workload and the rootfs mount to be gone",
             lambda: child not in processes() and workload not in processes() and not mounts_under(str(kyb.state)), 20)
    assert not Path(manager.socket_path(address)).exists()
    assert not Path(manager.socket_path(state.child_address)).exists()
    assert manager.GroupState.load(address) is None
    # No socket of the killed pair is left, the runc shim's debug socket included.
    assert [p for p in pair_sockets if Path(p).exists()] == []


def test_ordinary_deletes_leave_nothing_behind(kyb: Containerd) -> None:
    sockets = set(os.listdir(manager.SOCKET_DIR))
    kyb.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX_IMAGE, "gone", "true")
    # containerd does not wait for a shim daemon to exit after Shutdown (nor for the runc shim's): ours
    # removes its group state first and then exits on its own, moments later on a loaded machine.
    wait_for("our shim daemon to exit", lambda: shim_pids(kyb, SHIM_BINARY) == [], 10)
    wait_for("the runc shim to exit", lambda: shim_pids(kyb, RUNC_SHIM_BINARY) == [], 10)
    address = manager.socket_address(str(kyb.address), kyb.namespace, "gone")
    assert not Path(manager.socket_path(address)).exists()
    assert manager.GroupState.load(address) is None
    assert mounts_under(str(kyb.state)) == []
    # Nor the runc shim's socket (containerd 1.6's removes ours, named by the bundle's address file, not its own).
    # Other tests run one at a time, so any new socket file would be this container's.
    wait_for("no socket of the container left", lambda: set(os.listdir(manager.SOCKET_DIR)) <= sockets, 10)


def test_garbage_on_the_shim_socket_does_not_take_it_down(kyb: Containerd) -> None:
    run_d(kyb, "g1", "sleep", "3600")
    path = manager.socket_path(manager.socket_address(str(kyb.address), kyb.namespace, "g1"))
    for garbage in (b"\x00" * 3, b"\xff" * 64, b"GET / HTTP/1.1\r\n\r\n", b"\x00\x00\x00\x05\x00\x00\x00\x02\x01\x00hello"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(garbage)
            s.settimeout(2)
            try:
                s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                pass
    assert task_status(kyb, "g1") == "RUNNING"
    assert kyb.ctr("tasks", "exec", "--exec-id", "after", "g1", "echo", "alive").stdout == "alive\n"
    kyb.ctr("tasks", "kill", "-s", "SIGKILL", "g1")


def _rss_kib(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def test_300_connections_holding_almost_full_frames_leave_the_shim_small(kyb: Containerd) -> None:
    # Before the ttrpc server's caps this grew the shim to 1.76 GB (issue 9, finding 5c).
    run_d(kyb, "held", "sleep", "3600")
    [shim] = shim_pids(kyb, SHIM_BINARY)
    path = manager.socket_path(manager.socket_address(str(kyb.address), kyb.namespace, "held"))
    before = _rss_kib(shim)
    almost = (4 << 20) - 1
    peers: list[socket.socket] = []
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peers.append(s)
            s.connect(path)
        for s in peers:
            try:  # returns once the shim has read all but what the socket buffer holds
                s.sendall(almost.to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([1, 0]) + bytes(almost - 1))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused: more connections than the shim takes
        during = _rss_kib(shim)
        grown_mib = (during["VmHWM"] - before["VmHWM"]) / 1024
        print(f"shim RSS before {before['VmRSS'] / 1024:.1f} MiB, holding {during['VmRSS'] / 1024:.1f} MiB, "
              f"peak grew {grown_mib:.1f} MiB")
        # The caps: 16 MiB of large frames, 2 MiB of small ones, 32 connections' read buffers (2 x 256 KiB).
        assert grown_mib < 64, (before, during)
    finally:
        for s in peers:
            s.close()
    assert task_status(kyb, "held") == "RUNNING"
    assert kyb.ctr("tasks", "exec", "--exec-id", "after", "held", "echo", "alive").stdout == "alive\n"
    kyb.ctr("tasks", "kill", "-s", "SIGKILL", "held")
