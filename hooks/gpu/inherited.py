"""GPU device files that forked children inherited from a CUDA process: find them, and drop them.

A process that forks after CUDA is initialised (PyTorch's DataLoader with fork workers, a
multiprocessing.Pool) hands its children copies of its /dev/nvidia* mappings and of its open
/dev/nvidia* descriptors (CUDA opens them O_CLOEXEC, which only exec closes). The children cannot
use CUDA (the driver does not support a context across fork, and answers "not a CUDA process" for
them), so these are dead weight; but the driver's checkpoint only empties the CUDA process itself,
and CRIU refuses to dump a process that still maps or holds a GPU device file. docs/
inherited-gpu-mappings.md says why dropping them is safe and what would break it.

Which items are dropped, in a non-CUDA process of the container that descends from a CUDA process:
- every descriptor on a GPU device file that refers to the same open file as a descriptor of a
  CUDA process (kcmp, read before the driver's checkpoint closes the CUDA process's own): it was
  inherited, not opened;
- every mapping of a GPU device file.
A process that also holds a GPU device descriptor it opened itself (NVML in a child, say) may be
using the device: it is left alone entirely, with a warning (CRIU will then name it if it refuses).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass

from kybernate.hooks.api import procfs
from kybernate.hooks.api.errors import InheritedDropFailed, ProcessPaused
from kybernate.hooks.api.model import InheritedDrop

from . import inject
from .blocking import StillRunning, run_blocking

log = logging.getLogger(__name__)

# /dev/nvidia0.., /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-uvm-tools, /dev/nvidia-modeset, /dev/nvidia-caps/*
GPU_DEVICE_PREFIX = "/dev/nvidia"
# Generations of parents to walk up looking for the CUDA process (a fork of a fork of it).
MAX_DEPTH = 64
# Seconds beyond the injection's own bound that the request waits for its thread.
GRACE_S = 5.0


def is_gpu_device(path: str) -> bool:
    return path.removesuffix(" (deleted)").startswith(GPU_DEVICE_PREFIX)


@dataclass(frozen=True, slots=True)
class Holder:
    """A non-CUDA process holding GPU device files, and which of them it inherited."""

    pid: int
    comm: str
    cuda_ancestor: int  # the CUDA process it descends from
    mappings: tuple[procfs.MapEntry, ...]
    fds: tuple[tuple[int, str], ...]  # (fd, path) sharing an open file with a CUDA process: inherited
    own_fds: tuple[tuple[int, str], ...]  # (fd, path) it opened itself: the process is left alone

    @property
    def name(self) -> str:
        return f"pid {self.pid} ({self.comm})"

    def items(self) -> list[str]:
        return [m.text for m in self.mappings] + [f"fd {fd} {path}" for fd, path in self.fds]


def _cuda_ancestor(pid: int, cuda: Collection[int]) -> int:
    current = pid
    for _ in range(MAX_DEPTH):
        current = procfs.parent(current)
        if current <= 1:
            return 0
        if current in cuda:
            return current
    return 0


def find_holders(candidates: Iterable[int], cuda_pids: Collection[int],
                 match: Callable[[str], bool] = is_gpu_device) -> list[Holder]:
    """The non-CUDA processes among `candidates` that descend from one of `cuda_pids` and hold GPU
    device files. Call it while the CUDA processes still hold theirs (before the driver's checkpoint):
    that is how inherited descriptors are told from opened ones."""
    cuda_fds = {c: [fd for fd, path in procfs.open_fds(c).items() if match(path)] for c in cuda_pids}
    out = []
    for pid in sorted(set(candidates) - set(cuda_pids)):
        ancestor = _cuda_ancestor(pid, cuda_pids)
        if not ancestor or not procfs.alive(pid):
            continue
        mappings = tuple(m for m in procfs.maps(pid) if match(m.path))
        fds = sorted((fd, path) for fd, path in procfs.open_fds(pid).items() if match(path))
        if not mappings and not fds:
            continue
        shared = [(fd, path) for fd, path in fds
                  if any(inject.same_file(pid, fd, c, cfd) for c, cfds in cuda_fds.items() for cfd in cfds)]
        own = [item for item in fds if item not in shared]
        out.append(Holder(pid, procfs.comm(pid), ancestor, mappings, tuple(shared), tuple(own)))
    return out


def find_residue(cuda_pids: Iterable[int], match: Callable[[str], bool] = is_gpu_device) -> list[Holder]:
    """GPU device mappings a checkpointed CUDA process still has although the driver released the device.

    Seen on driver 580 (H200, 2026-11-29): after cuCheckpointProcessCheckpoint a process that had run CUDA
    graphs or Triton kernels kept one 64 KiB write-only shared mapping of /dev/nvidia0 while holding no GPU
    device descriptor any more, and CRIU refused to dump it. Only such mappings count: a process that still
    holds a GPU device descriptor was not released by the driver, and is left alone (CRIU then says why).
    The driver's restore does not use the old mapping (docs/inherited-gpu-mappings.md has the runs)."""
    out = []
    for pid in sorted(cuda_pids):
        mappings = tuple(m for m in procfs.maps(pid) if match(m.path))
        if mappings and not any(match(path) for path in procfs.open_fds(pid).values()):
            out.append(Holder(pid, procfs.comm(pid), pid, mappings, (), ()))
    return out


def refuse_paused(container: str, holders: Iterable[Holder]) -> None:
    """Nothing may be injected into a stopped or frozen process: refuse before anything is changed."""
    for h in holders:
        reason = procfs.paused(h.pid)
        if reason is not None:
            raise ProcessPaused(
                f"{container}: {h.name}, forked from CUDA process {h.cuda_ancestor}, is {reason}; its inherited GPU "
                "device files must be dropped before the dump and that needs it running: checkpoint the GPU before "
                "pausing the container", pid=h.pid, step="drop_inherited")


def _unchanged(holder: Holder, match: Callable[[str], bool]) -> str | None:
    """Re-read while the process is stopped: an item that changed since the scan is not ours to drop."""
    now_maps = {(m.start, m.end, m.path) for m in procfs.maps(holder.pid) if match(m.path)}
    for m in holder.mappings:
        if (m.start, m.end, m.path) not in now_maps:
            return f"mapping {m.text} changed since the scan"
    now_fds = procfs.open_fds(holder.pid)
    for fd, path in holder.fds:
        if now_fds.get(fd) != path:
            return f"fd {fd} no longer points to {path}"
    return None


def drop_one(holder: Holder, timeout_s: float, match: Callable[[str], bool] = is_gpu_device,
             insn: int | None = None) -> InheritedDrop:
    """Blocking: munmap the inherited mappings and close the inherited descriptors inside the process."""
    calls = [inject.munmap(m.start, m.end - m.start, f"munmap {m.text}") for m in holder.mappings]
    calls += [inject.close(fd, f"close fd {fd} {path}") for fd, path in holder.fds]
    inject.run_syscalls(holder.pid, calls, timeout_s, insn=insn, check=lambda: _unchanged(holder, match))
    return InheritedDrop(holder.pid, holder.comm, holder.cuda_ancestor, tuple(m.text for m in holder.mappings),
                         tuple(f"{fd} {path}" for fd, path in holder.fds))


async def drop_all(container: str, holders: Iterable[Holder], executor: Executor | None,
                   timeout_s: float, match: Callable[[str], bool] = is_gpu_device) -> tuple[InheritedDrop, ...]:
    """Drop the inherited items of every holder, one process at a time; stop at the first failure."""
    done: list[InheritedDrop] = []
    for h in holders:
        if h.own_fds:
            log.warning("process holds GPU device files it opened itself: left alone (a CRIU dump will refuse it)",
                        extra={"fields": {"container": container, "pid": h.pid, "comm": h.comm,
                                          "own": ",".join(f"{fd}:{p}" for fd, p in h.own_fds)}})
            continue
        what = f"drop inherited GPU files of pid {h.pid}"
        try:
            record = await run_blocking(drop_one, h, timeout_s, match, what=what, executor=executor,
                                        timeout_s=timeout_s + GRACE_S)
        except StillRunning as err:
            raise _failed(container, h, done, f"it did not stop for ptrace within {timeout_s:.3g} s", False) from err
        except inject.InjectError as err:
            raise _failed(container, h, done, err.message, err.changed, err.done) from err
        log.info("dropped GPU device files inherited from a CUDA process",
                 extra={"fields": {"container": container, "pid": h.pid, "comm": h.comm, "parent": h.cuda_ancestor,
                                   "mappings": ";".join(record.mappings), "fds": ";".join(record.fds)}})
        done.append(record)
    return tuple(done)


def _failed(container: str, h: Holder, done: list[InheritedDrop], why: str, changed: bool,
            ran: Iterable[str] = ()) -> InheritedDropFailed:
    state = (f"it lost only {', '.join(ran)} (dead weight: it cannot use them)" if changed
             else "it was left exactly as it was")
    earlier = f"; already dropped from pid(s) {', '.join(str(d.pid) for d in done)}" if done else ""
    return InheritedDropFailed(
        f"{container}: cannot drop the GPU device files {h.name} inherited from CUDA process {h.cuda_ancestor} "
        f"({'; '.join(h.items())}): {why}; {state}{earlier}. CRIU cannot dump a process that maps a GPU device",
        pid=h.pid, step="drop_inherited")
