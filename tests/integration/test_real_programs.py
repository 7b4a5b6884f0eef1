"""The CPU corpus: real program patterns checkpointed (leave-running and exit), restored, and checked exactly.

Each pattern of tests/corpus/patterns.py runs under the kybernate runtime with the host's python3 (read-only
bind mounts of /usr, /lib, /lib64: the image has only busybox). One container goes through both kinds of
checkpoint: a leave-running one (the program must keep running), then an exit one; the exit checkpoint is
restored and must continue at the very next step; then that task is killed and the leave-running
checkpoint is restored too. Every line the program ever wrote must match the chain computed without any
machinery (patterns.reference), and there must be exactly one fresh start.

Every pattern runs on containerd 1.6.20; a representative subset (one of each kind of kernel object) on
2.1.9. Patterns CRIU cannot take list the clear error the user gets instead (docs/limits.md says why).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, RUNTIME
from harness.containerd import Containerd
from harness.containerd_api import CRIU_CHECKPOINT_MEDIA_TYPE, ContainerdApi, ContainerdError, criu_checkpoint
from harness.images import BUSYBOX_IMAGE
from harness.workload import wait_for

sys.path.insert(0, str(ROOT / "tests" / "corpus"))
import patterns  # noqa: E402

pytestmark = pytest.mark.stack

CORPUS = ROOT / "tests" / "corpus"
# The host's python, as the container sees it through the bind mounts below.
PYTHON = "/usr/bin/python3"
HOST_MOUNTS = (("/usr", "/usr"), ("/usr/lib", "/lib"), ("/usr/lib64", "/lib64"))

ALL = [p for p in patterns.PATTERNS if p != "growing-file"]  # that one has its own test below
ON_2_1 = ["loader-spawn", "posix-shm", "socketpair", "eventfd-epoll", "tcp-listen", "tcp-established"]
# Patterns CRIU refuses, with (part of) the one-line reason the user gets.
REFUSED: dict[str, str] = {
    # A connection to a peer CRIU cannot freeze as well; docs/limits.md says why it is not turned on.
    "tcp-established": "Connected TCP socket",
    # A watch on the overlay rootfs: overlayfs hands out no file handles CRIU can reopen, and CRIU's
    # inode map scans only a few fixed paths unless told where to look (irmap-scan-path, see below).
    "inotify": "fsnotify: Can't dump that handle",
}

CASES = [pytest.param("1.6", p, id=f"ctrd1.6-{p}") for p in ALL] + [
    pytest.param("2.1", p, id=f"ctrd2.1-{p}") for p in ON_2_1
]


class Program:
    """One corpus program in a container, and the lines it has written so far."""

    def __init__(self, c: Containerd, pattern: str, out: Path, extra: tuple[str, ...] = ()) -> None:
        self.c, self.pattern, self.out = c, pattern, out
        self.name = pattern
        out.mkdir()
        mounts = []
        for src, dst in HOST_MOUNTS:
            mounts += ["--mount", f"type=bind,src={src},dst={dst},options=bind:ro"]
        mounts += ["--mount", f"type=bind,src={CORPUS},dst=/corpus,options=bind:ro",
                   "--mount", f"type=bind,src={out},dst=/out,options=bind:rw"]
        c.ctr("run", "-d", "--runtime", RUNTIME, *mounts, *extra, BUSYBOX_IMAGE, self.name,
              PYTHON, "/corpus/patterns.py", pattern, "/out")

    def lines(self) -> list[str]:
        path = self.out / "seq"
        return path.read_text().splitlines() if path.exists() else []

    def last_step(self) -> int:
        steps = [int(line.split()[0]) for line in self.lines() if line != "start"]
        return steps[-1] if steps else -1

    def wait_past(self, step: int, what: str) -> int:
        return wait_for(what, lambda: (s := self.last_step()) > step and s, timeout=20)

    def check(self) -> None:
        """Every line the program wrote is the reference line of its step; one fresh start only."""
        lines = self.lines()
        assert lines.count("start") == 1, f"{self.pattern} started afresh: {lines.count('start')} starts"
        steps = [line for line in lines if line != "start"]
        top = max(int(line.split()[0]) for line in steps)
        expected = patterns.reference(top + 1)
        wrong = [line for line in steps if expected[int(line.split()[0])] != line]
        assert not wrong, f"{self.pattern}: lines off the reference chain: {wrong[:3]}"


def _restart_from(api: ContainerdApi, c: Containerd, prog: Program, descriptors: list) -> int:
    """Restore the task from a checkpoint; returns the first step the restored program writes."""
    seen = len(prog.lines())
    api.create_task_from_checkpoint(prog.name, criu_checkpoint(descriptors))
    api.start_task(prog.name)
    assert api.task_status(prog.name) == "RUNNING"
    wait_for("the restored program to write", lambda: len(prog.lines()) > seen + 5, timeout=20)
    return int(prog.lines()[seen].split()[0])


def _keep_criu_log(message: str, where: Path) -> None:
    if "(CRIU log: " in message:
        log = Path(message.split("(CRIU log: ")[1].split(")")[0])
        if log.exists():
            shutil.copy(log, where / log.name)


def _forget_spec_blob(c: Containerd, descriptors: list) -> None:
    """containerd stores the container's spec with every checkpoint and refuses to store the same blob twice
    (ALREADY_EXISTS): drop it, a restore needs only the CRIU image."""
    for d in descriptors:
        if d.media_type != CRIU_CHECKPOINT_MEDIA_TYPE:
            c.ctr("content", "rm", d.digest)


def _stop(api: ContainerdApi, c: Containerd, name: str) -> None:
    c.ctr("tasks", "kill", "-s", "SIGKILL", name)
    wait_for("the task to stop", lambda: api.task_status(name) == "STOPPED", timeout=10)
    api.delete_task(name)


def _tcp_answer(api: ContainerdApi, name: str) -> int:
    """The step the program's TCP server reports, asked from the host inside the container's netns."""
    script = (f"import socket; s = socket.create_connection(('127.0.0.1', {patterns.TCP_PORT}), timeout=5); "
              "print(s.recv(64).decode().split()[1])")
    pid = str(api.get_task(name).pid)
    done = subprocess.run(["nsenter", "-t", pid, "-n", PYTHON, "-c", script], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, f"no answer from the TCP server of {name}: {done.stderr.strip().splitlines()[-1]}"
    return int(done.stdout.strip())


def _lo_up(api: ContainerdApi, name: str) -> None:
    """`ctr run` gives the container a network namespace whose loopback is down (no CNI): bring it up."""
    subprocess.run(["nsenter", "-t", str(api.get_task(name).pid), "-n", "ip", "link", "set", "lo", "up"],
                   check=True, timeout=30)


@pytest.mark.parametrize(("version", "pattern"), CASES)
def test_pattern_checkpoints_and_continues_exactly(kyb_factory, tmp_path: Path, version: str, pattern: str) -> None:
    _run(kyb_factory(version), pattern, tmp_path, refused=REFUSED.get(pattern))


def test_node_criu_options_reach_criu(kyb_factory, tmp_path: Path) -> None:
    """runtime.toml's [kybernate] criu_options: with a scan path for CRIU's inode map, inotify works."""
    toml = (ROOT / "containerd-config" / "runtime.toml").read_text()
    assert "criu_options = []" in toml
    c = kyb_factory("1.6", runtime_toml=toml.replace("criu_options = []", 'criu_options = ["irmap-scan-path /tmp"]'))
    _run(c, "inotify", tmp_path, refused=None)


def test_a_users_own_org_criu_config_wins(kyb_factory, tmp_path: Path) -> None:
    """An empty org.criu.config means no CRIU config file: no link-remap, and spawn workers are refused."""
    c = kyb_factory("1.6")
    _run(c, "loader-spawn", tmp_path, refused="Can't create link remap for /dev/shm/sem.",
         extra=("--annotation", "org.criu.config="))


def test_a_restore_criu_refuses_says_why(kyb_factory, tmp_path: Path) -> None:
    """A leave-running checkpoint restored after the program grew a file it holds open read-write:
    CRIU refuses the restore (the file's size differs from the dump's), and Start says so in one line."""
    c = kyb_factory("1.6")
    prog = Program(c, "growing-file", tmp_path / "out")
    prog.wait_past(10, "the program to run")
    with ContainerdApi(c.address, c.namespace) as api:
        leave = api.checkpoint_task(prog.name, exit=False)
        _forget_spec_blob(c, leave)
        prog.wait_past(prog.last_step() + 5, "the file to grow past its size at the dump")
        _stop(api, c, prog.name)
        api.create_task_from_checkpoint(prog.name, criu_checkpoint(leave))
        with pytest.raises(ContainerdError) as failure:
            api.start_task(prog.name)
        message = str(failure.value)
        assert "criu restore failed: pid " in message and "has bad size" in message, message
        assert "\n" not in message.split("criu restore failed")[-1], message
        # Nothing half-restored is left: the task is gone with the failed Start or deletes cleanly.
        try:
            api.delete_task(prog.name)
        except ContainerdError as err:
            assert err.code is not None and err.code.name == "NOT_FOUND", err
        assert not [t for t in c.ctr("tasks", "ls", "-q").stdout.split() if t == prog.name]
    prog.check()


def _run(c: Containerd, pattern: str, tmp_path: Path, refused: str | None, extra: tuple[str, ...] = ()) -> None:
    prog = Program(c, pattern, tmp_path / "out", extra)
    prog.wait_past(10, f"{pattern} to run")
    with ContainerdApi(c.address, c.namespace) as api:
        if refused is not None:
            _assert_refused_clearly(api, prog, refused)
            return
        if pattern == "tcp-listen":
            _lo_up(api, prog.name)
            assert _tcp_answer(api, prog.name) >= 0

        # Leave-running: the program goes on.
        before = prog.last_step()
        try:
            leave = api.checkpoint_task(prog.name, exit=False)
        except ContainerdError as err:  # keep CRIU's whole log beside the test's output
            _keep_criu_log(str(err), tmp_path)
            raise
        _forget_spec_blob(c, leave)
        after = prog.last_step()
        assert api.task_status(prog.name) == "RUNNING"
        prog.wait_past(after + 5, "the program to run on after a leave-running checkpoint")

        # Exit: the program is dumped and gone; its restore continues at the very next step.
        dumped = api.checkpoint_task(prog.name, exit=True)
        wait_for("the exit checkpoint to stop the task", lambda: api.task_status(prog.name) == "STOPPED", timeout=10)
        last = prog.last_step()
        api.delete_task(prog.name)
        first = _restart_from(api, c, prog, dumped)
        assert first == last + 1, f"{pattern}: restored at step {first}, dumped after step {last}"
        if pattern == "tcp-listen":  # a fresh network namespace again (a pod's would be the sandbox's, up)
            _lo_up(api, prog.name)
            assert _tcp_answer(api, prog.name) > last
        _stop(api, c, prog.name)

        # The leave-running checkpoint restores too, at the step it was taken.
        first = _restart_from(api, c, prog, leave)
        assert before + 1 <= first <= after + 1, f"{pattern}: restored at {first}, taken between {before}/{after}"
        prog.wait_past(first + 5, "the program restored from the leave-running checkpoint to run on")
        _stop(api, c, prog.name)
    prog.check()


def _assert_refused_clearly(api: ContainerdApi, prog: Program, reason: str) -> None:
    for exit_ in (False, True):
        with pytest.raises(ContainerdError) as failure:
            api.checkpoint_task(prog.name, exit=exit_)
        message = str(failure.value)
        assert "criu dump failed: pid " in message and reason in message, message
        assert "\n" not in message.split("criu dump failed")[-1], message
        assert api.task_status(prog.name) == "RUNNING"
        prog.wait_past(prog.last_step() + 5, "the refused program to run on")
    _stop(api, prog.c, prog.name)
    prog.check()
