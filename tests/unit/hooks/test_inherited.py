"""Dropping what forked children inherited, by ptrace syscall injection, on real host processes.

A python "parent" stands in for a CUDA process: it opens two files standing in for GPU device files
(O_CLOEXEC, as CUDA opens them), maps one MAP_SHARED, then forks a worker. The worker answers
"N" lines on stdin with sum(i*i for i in range(N)), so every test can check that it still reads,
computes and writes correctly after hookd ran syscalls inside it, including while it was blocked in
read() when ptrace stopped it (the kernel must restart that read).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hookd_testlib import G0, Freezer, GiB, run

from kybernate.hooks.api import procfs
from kybernate.hooks.api.errors import InheritedDropFailed, ProcessPaused
from kybernate.hooks.gpu import inherited, inject
from kybernate.hooks.hookd.manager import ContainerRef, GpuManager

PARENT = textwrap.dedent("""
    import mmap, os, sys, time
    dev, ctl = sys.argv[1], sys.argv[2]
    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    ctl_fd = os.open(ctl, os.O_RDWR | os.O_CLOEXEC)
    region = mmap.mmap(fd, 2 * mmap.PAGESIZE, mmap.MAP_SHARED)
    region[:5] = b"cuda!"
    pid = os.fork()
    if pid == 0:
        for line in sys.stdin:
            word = line.strip()
            if word == "thread":  # a second thread that keeps computing while the main one is traced
                import threading
                ticks = [0]
                def spin():
                    while True:
                        ticks[0] += 1
                threading.Thread(target=spin, daemon=True).start()
                print("started", flush=True)
                continue
            if word == "ticks":
                print(ticks[0], flush=True)
                continue
            if word.startswith("open "):
                own = os.open(word[5:], os.O_RDONLY)
                print(f"opened {own}", flush=True)
                continue
            n = int(word)
            total = 0
            for _ in range(3):
                total = sum(i * i for i in range(n))
            print(total, flush=True)
        os._exit(0)
    print(pid, flush=True)
    while True:
        time.sleep(3600)
""")


@dataclass
class Family:
    parent: subprocess.Popen[str]
    worker: int
    dev: Path
    ctl: Path

    def ask(self, n: int) -> int:
        assert self.parent.stdin and self.parent.stdout
        self.parent.stdin.write(f"{n}\n")
        self.parent.stdin.flush()
        return int(self.parent.stdout.readline())

    def say(self, line: str) -> str:
        assert self.parent.stdin and self.parent.stdout
        self.parent.stdin.write(line + "\n")
        self.parent.stdin.flush()
        return self.parent.stdout.readline().strip()

    def mapped(self) -> list[str]:
        return [m.path for m in procfs.maps(self.worker) if m.path.startswith(str(self.dev.parent))]

    def fds(self) -> list[str]:
        return sorted(p for p in procfs.open_fds(self.worker).values() if p.startswith(str(self.dev.parent)))


def start_family(directory: Path, env: dict[str, str] | None = None) -> Family:
    directory.mkdir(parents=True, exist_ok=True)
    dev, ctl = directory / "nvidia0", directory / "nvidiactl"
    for f in (dev, ctl):
        f.write_bytes(b"\0" * 8192)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(dev), str(ctl)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert parent.stdout
    worker = int(parent.stdout.readline())
    return Family(parent, worker, dev, ctl)


@pytest.fixture
def family(tmp_path: Path) -> Iterator[Family]:
    fam = start_family(tmp_path / "dev")
    yield fam
    os.killpg(fam.parent.pid, signal.SIGKILL)
    fam.parent.wait()


def matcher(fam: Family) -> Callable[[str], bool]:
    return lambda path: path.startswith(str(fam.dev.parent))


def expect(n: int) -> int:
    return sum(i * i for i in range(n))


def test_the_worker_loses_its_inherited_mapping_and_fds_and_computes_on(family: Family) -> None:
    assert family.ask(1000) == expect(1000)
    # Python's mmap keeps a dup of the descriptor: three inherited descriptors on two files.
    assert family.mapped() == [str(family.dev)] and set(family.fds()) == {str(family.dev), str(family.ctl)}
    [holder] = inherited.find_holders([family.worker], [family.parent.pid], matcher(family))
    assert holder.cuda_ancestor == family.parent.pid and holder.comm.startswith("python")
    assert [fd for fd, _ in holder.fds] and not holder.own_fds  # kcmp: the same open files as the parent's

    # The worker is blocked in read() on stdin now: the kernel must restart that read after the detach.
    record = inherited.drop_one(holder, timeout_s=10, match=matcher(family))

    assert family.mapped() == [] and family.fds() == []
    assert record.pid == family.worker and record.parent_pid == family.parent.pid
    assert record.mappings == (holder.mappings[0].text,) and len(record.fds) == 3
    assert family.ask(20000) == expect(20000)
    # The parent's own mapping and files are untouched.
    parent_maps = [m.path for m in procfs.maps(family.parent.pid)]
    assert str(family.dev) in parent_maps
    assert procfs.alive(family.parent.pid) and procfs.alive(family.worker)


def test_injection_while_the_worker_computes(family: Family) -> None:
    [holder] = inherited.find_holders([family.worker], [family.parent.pid], matcher(family))
    assert family.parent.stdin and family.parent.stdout
    family.parent.stdin.write("300000\n")  # a few hundred ms of pure-python arithmetic
    family.parent.stdin.flush()
    inherited.drop_one(holder, timeout_s=10, match=matcher(family))
    assert int(family.parent.stdout.readline()) == expect(300000)
    assert family.mapped() == [] and family.fds() == []
    assert family.ask(777) == expect(777)


def test_a_multithreaded_worker_keeps_all_its_threads_running(family: Family) -> None:
    assert family.say("thread") == "started"
    [holder] = inherited.find_holders([family.worker], [family.parent.pid], matcher(family))
    inherited.drop_one(holder, timeout_s=10, match=matcher(family))
    assert family.mapped() == [] and family.fds() == []
    first = int(family.say("ticks"))
    assert family.ask(2000) == expect(2000)
    # The other thread spins on. Under load the GIL may not hand it a turn between two questions, so
    # wait for it to move (bounded) rather than expect it to have moved by the next question.
    deadline = time.monotonic() + 30
    while int(family.say("ticks")) <= first:
        assert time.monotonic() < deadline, "the worker's second thread stopped after the injection"
    assert len(os.listdir(f"/proc/{family.worker}/task")) == 2


def test_a_descriptor_the_worker_opened_itself_is_not_inherited_and_the_worker_is_left_alone(
        family: Family, tmp_path: Path) -> None:
    own = family.dev.parent / "nvidia-uvm"
    own.write_bytes(b"x")
    assert family.say(f"open {own}").startswith("opened ")
    [holder] = inherited.find_holders([family.worker], [family.parent.pid], matcher(family))
    assert [p for _, p in holder.own_fds] == [str(own)]
    assert {p for _, p in holder.fds} == {str(family.dev), str(family.ctl)}

    dropped = run(inherited.drop_all("ns/c", [holder], None, 10, matcher(family)))

    assert dropped == ()
    assert family.mapped() == [str(family.dev)] and len(family.fds()) == 4
    assert family.ask(100) == expect(100)


def test_a_stopped_worker_is_refused_and_left_as_it_was(family: Family) -> None:
    [holder] = inherited.find_holders([family.worker], [family.parent.pid], matcher(family))
    os.kill(family.worker, signal.SIGSTOP)
    try:
        _wait_state(family.worker, "T")
        with pytest.raises(ProcessPaused, match="stopped"):
            inherited.refuse_paused("ns/c", [holder])
        with pytest.raises(inject.InjectError, match="stopped") as err:
            inherited.drop_one(holder, timeout_s=5, match=matcher(family))
        assert not err.value.changed
        assert family.mapped() == [str(family.dev)] and len(family.fds()) == 3
    finally:
        os.kill(family.worker, signal.SIGCONT)
    assert family.ask(500) == expect(500)


def test_a_frozen_worker_is_refused(family: Family, freezer: Freezer) -> None:
    [holder] = inherited.find_holders([family.worker], [family.parent.pid], matcher(family))
    freezer.add(family.worker)
    freezer.freeze()
    try:
        with pytest.raises(ProcessPaused, match="frozen"):
            inherited.refuse_paused("ns/c", [holder])
        with pytest.raises(inject.InjectError, match="frozen"):
            inherited.drop_one(holder, timeout_s=5, match=matcher(family))
    finally:
        freezer.thaw()
    assert family.mapped() == [str(family.dev)]
    assert family.ask(500) == expect(500)


def test_a_failing_injection_leaves_the_worker_exactly_as_it_was(family: Family) -> None:
    [holder] = inherited.find_holders([family.worker], [family.parent.pid], matcher(family))
    # An address in executable memory that holds no syscall instruction: refused once the worker is stopped.
    code = next(m for m in procfs.maps(family.worker) if "x" in m.perms and m.path != "[vsyscall]")
    fd = os.open(f"/proc/{family.worker}/mem", os.O_RDONLY)
    try:
        data = os.pread(fd, 64, code.start)
    finally:
        os.close(fd)
    bogus = code.start + next(i for i in range(63) if data[i:i + 2] != inject.SYSCALL_INSN)
    status_before = _status_fields(family.worker)
    with pytest.raises(inject.InjectError, match="no syscall instruction") as err:
        inherited.drop_one(holder, timeout_s=10, match=matcher(family), insn=bogus)
    assert not err.value.changed
    assert family.mapped() == [str(family.dev)] and len(family.fds()) == 3
    assert _status_fields(family.worker) == status_before  # not traced, same state
    assert family.ask(4321) == expect(4321)

    # An item that changed between the scan and the stop is not touched either.
    stale = inherited.Holder(holder.pid, holder.comm, holder.cuda_ancestor, holder.mappings,
                             holder.fds + ((99, str(family.ctl)),), ())
    with pytest.raises(inject.InjectError, match="fd 99") as err:
        inherited.drop_one(stale, timeout_s=10, match=matcher(family))
    assert not err.value.changed and len(family.fds()) == 3
    assert family.ask(10) == expect(10)


def test_drop_all_turns_a_failure_into_a_clear_error_naming_pid_comm_and_mapping(family: Family) -> None:
    [holder] = inherited.find_holders([family.worker], [family.parent.pid], matcher(family))
    os.kill(family.worker, signal.SIGSTOP)
    try:
        _wait_state(family.worker, "T")
        with pytest.raises(InheritedDropFailed) as err:
            run(inherited.drop_all("ns/c", [holder], None, 5, matcher(family)))
    finally:
        os.kill(family.worker, signal.SIGCONT)
    message = err.value.message
    assert f"pid {family.worker} (python" in message and holder.mappings[0].text in message
    assert "left exactly as it was" in message and err.value.pid == family.worker
    assert family.ask(3) == expect(3)


def test_manager_checkpoint_drops_the_inherited_gpu_files_of_a_forked_child(
        node, make_manager: Callable[..., GpuManager], tmp_path: Path) -> None:
    """The whole hookd path on the fake driver: the parent is a fake CUDA process (FAKEGPU_PROC), its
    forked child inherits that variable and is therefore no CUDA process (as with the real driver). The
    stand-in device files live in /dev under /dev/nvidia* names, so hookd's own matcher finds them."""
    devdir = Path(f"/dev/nvidia-kybtest-{os.getpid()}")
    env = {"PATH": os.environ["PATH"], **node.env, **node.process_env("p-fork", G0, GiB)}
    fam = start_family(devdir, env=env)
    try:
        async def go() -> tuple[object, object]:
            manager = make_manager()
            ref = ContainerRef("ns", "c", (fam.parent.pid, fam.worker))
            done = await manager.checkpoint(ref)
            back = await manager.restore(ref)
            return done, back

        result, _ = run(go())
        manifest = result.manifest  # type: ignore[attr-defined]
        assert [p.pid for p in manifest.processes] == [fam.parent.pid]
        [drop] = manifest.dropped_inherited
        assert drop.pid == fam.worker and drop.parent_pid == fam.parent.pid
        assert drop.mappings[0].endswith(str(fam.dev)) and {f.split()[1] for f in drop.fds} == {
            str(fam.dev), str(fam.ctl)}
        assert fam.mapped() == [] and fam.fds() == []
        assert manifest.to_dict()["dropped_inherited"][0]["pid"] == fam.worker
        assert fam.ask(999) == expect(999)
        ops = [(e.op, e.pid) for e in node.events() if e.op != "get_state"]
        assert ops == [("lock", fam.parent.pid), ("checkpoint", fam.parent.pid), ("restore", fam.parent.pid),
                       ("unlock", fam.parent.pid)]
    finally:
        os.killpg(fam.parent.pid, signal.SIGKILL)
        fam.parent.wait()
        for f in devdir.iterdir():
            f.unlink()
        devdir.rmdir()


def test_manager_rolls_the_cuda_processes_back_when_the_drop_fails(
        node, make_manager: Callable[..., GpuManager], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devdir = Path(f"/dev/nvidia-kybtest-{os.getpid()}-b")
    env = {"PATH": os.environ["PATH"], **node.env, **node.process_env("p-fail", G0, GiB)}
    fam = start_family(devdir, env=env)

    def broken(holder: inherited.Holder, timeout_s: float, match: object = None,
               insn: int | None = None) -> object:
        raise inject.InjectError("ptrace refused (test)")

    monkeypatch.setattr(inherited, "drop_one", broken)
    try:
        with pytest.raises(InheritedDropFailed) as err:
            run(make_manager().checkpoint(ContainerRef("ns", "c", (fam.parent.pid, fam.worker))))
        assert f"pid {fam.worker}" in err.value.message and "put back" in err.value.message
        assert node.state("p-fail").get("state") == "RUNNING"
        assert fam.mapped() == [str(fam.dev)]
        assert fam.ask(5) == expect(5)
    finally:
        os.killpg(fam.parent.pid, signal.SIGKILL)
        fam.parent.wait()
        for f in devdir.iterdir():
            f.unlink()
        devdir.rmdir()


def _wait_state(pid: int, letter: str) -> None:
    for _ in range(5000):
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == letter:
            return
        time.sleep(0.001)
    raise AssertionError(f"pid {pid} never reached state {letter}")


def _status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    wanted = ("TracerPid", "SigPnd", "ShdPnd")
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines) if k in wanted}


def test_dropped_inherited_travels_in_the_manifest_json_and_over_grpc() -> None:
    from kybernate.hooks.api import convert
    from kybernate.hooks.api.model import GpuManifest, GpuProcessRecord, InheritedDrop

    manifest = GpuManifest("580.159.04", (), (GpuProcessRecord(10, "CHECKPOINTED"),), "2026-11-29T00:00:00Z",
                           dropped_inherited=(InheritedDrop(11, "pt_data_worker", 10,
                                                            ("200600000-200800000 rw-s /dev/nvidia0",),
                                                            ("5 /dev/nvidiactl", "6 /dev/nvidia-uvm")),))
    assert GpuManifest.from_json(manifest.to_json()) == manifest
    assert convert.manifest_from_pb(convert.manifest_to_pb(manifest)) == manifest
    # A manifest written before this field existed still reads.
    old = manifest.to_dict()
    del old["dropped_inherited"]
    assert GpuManifest.from_dict(old).dropped_inherited == ()


RESIDUE = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fd = os.open(sys.argv[1], os.O_RDWR)
    # libc's mmap, not Python's (which keeps a dup of the descriptor): the mapping outlives the descriptor,
    # as the driver leaves it. PROT_WRITE, MAP_SHARED.
    assert libc.mmap(None, 4096, 2, 1, fd, 0) not in (None, ctypes.c_void_p(-1).value)
    os.close(fd)
    if sys.argv[2] == "keep-fd":
        held = os.open(sys.argv[1], os.O_RDWR)
    print("ready", flush=True)
    for line in sys.stdin:
        print(sum(i * i for i in range(int(line))), flush=True)
""")


@pytest.mark.parametrize("keep_fd", [False, True], ids=["released", "descriptor-held"])
def test_a_mapping_the_driver_left_behind_is_dropped_only_when_no_descriptor_is_held(
        tmp_path: Path, keep_fd: bool) -> None:
    """Driver 580 left a 64 KiB /dev/nvidia0 mapping in some checkpointed CUDA processes while closing every
    descriptor: that residue is dropped and the process computes on. A process still holding a device
    descriptor was not released by the driver and is left alone."""
    dev = tmp_path / "nvidia0"
    dev.write_bytes(b"\0" * 4096)
    proc = subprocess.Popen([sys.executable, "-c", RESIDUE, str(dev), "keep-fd" if keep_fd else "release"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout and proc.stdin and proc.stdout.readline().strip() == "ready"
        match = lambda path: path.startswith(str(dev))  # noqa: E731
        residue = inherited.find_residue([proc.pid], match)
        if keep_fd:
            assert residue == []
            return
        [holder] = residue
        assert holder.cuda_ancestor == proc.pid and holder.fds == () and len(holder.mappings) == 1
        record = inherited.drop_one(holder, timeout_s=10, match=match)
        assert record.mappings == (holder.mappings[0].text,)
        assert [m for m in procfs.maps(proc.pid) if match(m.path)] == []
        proc.stdin.write("1000\n")
        proc.stdin.flush()
        assert int(proc.stdout.readline()) == sum(i * i for i in range(1000))
    finally:
        proc.kill()
        proc.wait()
