"""Test helpers for the named fake GPU driver (C sources beside this file; README.md has the formats).

    built = build(tmp_dir)                      # gcc: libcuda.so.1, libnvidia-ml.so.1, cuda-checkpoint, fakegpu-forker
    node = FakeNode(state_dir)                  # one fake node: GPUs, processes, faults, events
    node.set_gpus([FakeGpu(uuid, "NVIDIA H100 80GB HBM3", 80 << 30)])
    proc = node.spawn("trainer-0", gpu=uuid, vram=4 << 30)   # a real `sleep` that is a "CUDA process"
    node.events()                               # what the driver saw, in order

Put `tests/fakes` on sys.path to import this package as `fakegpu`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMON = ("fakegpu.c",)
HEADERS = ("fakegpu.h",)
CFLAGS = ("-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-fPIC", "-fvisibility=hidden")


@dataclass(frozen=True, slots=True)
class Built:
    """Paths of the compiled fake: point hookd's --libcuda / --libnvml / --cuda-checkpoint at them."""

    dir: Path
    libcuda: Path
    libnvml: Path
    cli: Path
    forker: Path  # static: a fake CUDA program that forks workers after "CUDA init" (forker.c)


def _sources_digest() -> str:
    h = hashlib.sha256()
    for name in sorted((*COMMON, *HEADERS, "fakecuda.c", "fakenvml.c", "cuda_checkpoint_cli.c", "forker.c")):
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def build(dest: Path | None = None, cc: str = "gcc") -> Built:
    """Compile the fake into `dest/<digest>/` (reused while the sources are unchanged)."""
    if shutil.which(cc) is None:
        raise RuntimeError(f"the fake GPU driver needs a C compiler: {cc} not found (apt-get install gcc)")
    root = Path(dest) if dest else Path(tempfile.gettempdir()) / "kybernate-fakegpu"
    out = root / _sources_digest()
    built = Built(out, out / "libcuda.so.1", out / "libnvidia-ml.so.1", out / "cuda-checkpoint", out / "fakegpu-forker")
    if built.libcuda.exists() and built.libnvml.exists() and built.cli.exists() and built.forker.exists():
        return built
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        common = [str(HERE / c) for c in COMMON]
        jobs = [
            [cc, *CFLAGS, "-shared", "-Wl,-soname,libcuda.so.1", "-o", str(tmp / "libcuda.so.1"),
             str(HERE / "fakecuda.c"), *common],
            [cc, *CFLAGS, "-shared", "-Wl,-soname,libnvidia-ml.so.1", "-o", str(tmp / "libnvidia-ml.so.1"),
             str(HERE / "fakenvml.c"), *common],
            [cc, *CFLAGS, "-o", str(tmp / "cuda-checkpoint"), str(HERE / "cuda_checkpoint_cli.c"),
             str(HERE / "fakecuda.c"), *common],
            [cc, *CFLAGS, "-static", "-o", str(tmp / "fakegpu-forker"), str(HERE / "forker.c")],
        ]
        procs = [subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for job in jobs]
        for job, proc in zip(jobs, procs):
            output, _ = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"building the fake GPU driver failed: {' '.join(job)}\n{output}")
        try:
            tmp.rename(out)  # atomic: a concurrent build of the same digest simply loses the race
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return built


@dataclass(frozen=True, slots=True)
class FakeGpu:
    uuid: str
    name: str
    total_bytes: int
    minor: int | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One line of events.log: a checkpoint-API call as the fake driver saw it."""

    ns: int  # CLOCK_MONOTONIC when the call returned (compare with time.monotonic_ns())
    op: str  # get_state | lock | checkpoint | restore | unlock | restore_tid
    pid: int
    proc: str  # FAKEGPU_PROC of the target, "-" when it is not a fake CUDA process
    result: str  # CUDA_SUCCESS or CUDA_ERROR_*
    frozen: bool  # the target's cgroup was frozen when the call began
    alive: bool  # the pid existed (and was not a zombie) when the call began
    stopped: bool  # the target was stopped (SIGSTOP or ptrace) when the call began
    start_ns: int  # CLOCK_MONOTONIC when the call began
    state: str  # the process's state after the call, "-" when unknown
    gpu: str  # the GPU the process is on after the call (for restore: the target GPU), "-" if none
    pairs: int  # restore: number of GPU pairs passed; -1 for other calls
    caller: int  # pid of the process that called the driver (hookd, or the cuda-checkpoint CLI)


def parse_events(text: str) -> list[Event]:
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = dict(item.split("=", 1) for item in line.split())
        events.append(Event(
            ns=int(f["ns"]), op=f["op"], pid=int(f["pid"]), proc=f["proc"], result=f["result"],
            frozen=f["frozen"] == "1", alive=f["alive"] == "1", stopped=f.get("stopped") == "1",
            start_ns=int(f["start_ns"]), state=f["state"], gpu=f["gpu"], pairs=int(f["pairs"]),
            caller=int(f["caller"]),
        ))
    return events


class FakeNode:
    """One fake node in `state_dir`: which GPUs it has, its CUDA processes, faults, and the event log."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._children: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"FAKEGPU_STATE_DIR": str(self.dir)}

    def set_gpus(self, gpus: Sequence[FakeGpu]) -> None:
        lines = [f"{g.uuid}\t{g.name}\t{g.total_bytes}\t{i if g.minor is None else g.minor}" for i, g in enumerate(gpus)]
        (self.dir / "gpus.txt").write_text("\n".join(lines) + "\n")

    def set_driver_version(self, version: str) -> None:
        (self.dir / "driver_version").write_text(version + "\n")

    def set_faults(self, lines: Iterable[str]) -> None:
        (self.dir / "faults").write_text("".join(line + "\n" for line in lines))

    def clear_faults(self) -> None:
        (self.dir / "faults").unlink(missing_ok=True)

    @staticmethod
    def process_env(proc_id: str, gpu: str, vram: int) -> dict[str, str]:
        """The environment that makes a process a fake CUDA process (add FAKEGPU_STATE_DIR to tie it to a node)."""
        return {"FAKEGPU_PROC": proc_id, "FAKEGPU_GPU": gpu, "FAKEGPU_VRAM": str(vram)}

    def spawn(self, proc_id: str, gpu: str, vram: int, argv: Sequence[str] = ("sleep", "600"),
              extra_env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a real process that the fake driver treats as a CUDA process holding `vram` bytes on `gpu`."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env, **self.process_env(proc_id, gpu, vram),
               **(extra_env or {})}
        proc = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self._children.append(proc)
        return proc

    def set_utilization(self, proc_id: str, percent: int) -> None:
        """The GPU utilisation NVML's per-process samples report for a RUNNING process (0 when never set)."""
        (self.dir / "util").mkdir(exist_ok=True)
        (self.dir / "util" / proc_id).write_text(f"{percent}\n")

    def state(self, proc_id: str) -> dict[str, str]:
        """The driver's record of one process ({} until its first transition)."""
        path = self.dir / "procs" / proc_id
        if not path.exists():
            return {}
        return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)

    def events(self) -> list[Event]:
        path = self.dir / "events.log"
        return parse_events(path.read_text()) if path.exists() else []

    def kill_all(self) -> None:
        for proc in self._children:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: children go too
            except ProcessLookupError:
                pass
            proc.wait()
        self._children.clear()
