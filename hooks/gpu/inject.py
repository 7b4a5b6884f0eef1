"""Run a few system calls inside another process with ptrace (x86-64): munmap and close, for hookd.

How, for one target process (the thread-group leader):

1. PTRACE_SEIZE (no signal sent, nothing visible to the process) and PTRACE_INTERRUPT; wait for the
   stop, bounded in time. A signal that arrives meanwhile is remembered and handed back at detach.
2. Save the registers (PTRACE_GETREGS).
3. Per call: point RIP at a `syscall` instruction (bytes 0f 05) that already exists in one of the
   process's executable mappings (found by reading /proc/<pid>/mem: nothing is written into the
   process), put the number in RAX and the arguments in RDI/RSI, set ORIG_RAX to -1 so that the
   kernel's syscall-restart logic leaves our registers alone, PTRACE_SINGLESTEP, and read RAX.
4. Put the saved registers back exactly and PTRACE_DETACH. A process stopped inside an interruptible
   system call (read, nanosleep, futex...) had RAX = -ERESTART* and ORIG_RAX = its syscall number:
   with those restored, the kernel restarts that call as it would after any signal, so the process
   never notices.

Every ptrace call for a tracee must come from the thread that attached it, so the whole sequence is
one blocking function (`run_syscalls`), run in hookd's executor. The caller checks beforehand that
the process is neither stopped nor cgroup-frozen (a frozen process never reaches the stop); a
process that does not stop within the bound is left untouched: the function waits for the stop it
asked for (it cannot detach a running tracee) and then detaches without changing anything.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kybernate.hooks.api import procfs

PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for the tracee whatever kind of thread it is
SYS_CLOSE = 3
SYS_MUNMAP = 11
SYS_KCMP = 312
KCMP_FILE = 0
SYSCALL_INSN = b"\x0f\x05"
# How much executable memory to read at most while looking for a `syscall` instruction. The vDSO
# (8 KiB, read first) and libc almost always have one within the first pages.
SCAN_LIMIT_BYTES = 64 << 20
_CHUNK = 1 << 20


class InjectError(Exception):
    """Injection failed. `changed` is False when the process was left exactly as it was."""

    def __init__(self, message: str, *, changed: bool = False, done: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.changed = changed
        self.done = tuple(done)  # the calls that had already run (when changed)


class Regs(ctypes.Structure):
    """struct user_regs_struct of x86-64 (sys/user.h), field order as the kernel lays it out."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


@dataclass(frozen=True, slots=True)
class Syscall:
    """One call to run: number and up to two arguments, with a label for messages."""

    nr: int
    args: tuple[int, ...]
    label: str


def munmap(start: int, length: int, label: str) -> Syscall:
    return Syscall(SYS_MUNMAP, (start, length), label)


def close(fd: int, label: str) -> Syscall:
    return Syscall(SYS_CLOSE, (fd,), label)


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.ptrace.restype = ctypes.c_long
        lib.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.syscall.restype = ctypes.c_long
        _libc = lib
    return _libc


def supported() -> str | None:
    """Why injection cannot work on this machine, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"syscall injection is implemented for x86-64 only, this machine is {platform.machine()}"
    return None


def same_file(pid_a: int, fd_a: int, pid_b: int, fd_b: int) -> bool:
    """kcmp(KCMP_FILE): do the two descriptors refer to one open file description (as after fork)?"""
    rc = _c().syscall(SYS_KCMP, ctypes.c_int(pid_a), ctypes.c_int(pid_b), ctypes.c_int(KCMP_FILE),
                      ctypes.c_ulong(fd_a), ctypes.c_ulong(fd_b))
    return bool(rc == 0)


def _ptrace(request: int, pid: int, addr: int = 0, data: object = None) -> None:
    ctypes.set_errno(0)
    rc = _c().ptrace(request, pid, ctypes.c_void_p(addr), data)
    if rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, {pid}): {os.strerror(err)}")


def _getregs(pid: int) -> Regs:
    regs = Regs()
    _ptrace(PTRACE_GETREGS, pid, 0, ctypes.byref(regs))
    return regs


def _setregs(pid: int, regs: Regs) -> None:
    _ptrace(PTRACE_SETREGS, pid, 0, ctypes.byref(regs))


def find_syscall_insn(pid: int) -> int:
    """Address of a `syscall` instruction in one of the process's executable mappings."""
    entries = [m for m in procfs.maps(pid) if "x" in m.perms and m.path != "[vsyscall]"]
    entries.sort(key=lambda m: (m.path != "[vdso]", "libc" not in m.path))
    budget = SCAN_LIMIT_BYTES
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise InjectError(f"cannot read the memory of pid {pid}: {err.strerror}") from err
    try:
        for m in entries:
            addr = m.start
            while addr < m.end and budget > 0:
                size = min(_CHUNK, m.end - addr, budget)
                try:
                    data = os.pread(fd, size + 1 if addr + size < m.end else size, addr)
                except OSError:
                    break
                budget -= size
                at = data.find(SYSCALL_INSN)
                if at >= 0:
                    return addr + at
                addr += size
    finally:
        os.close(fd)
    raise InjectError(f"no syscall instruction found in the executable mappings of pid {pid}")


def _read_code(pid: int, addr: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, 2, addr)
    finally:
        os.close(fd)


class _Tracee:
    """One seized process; every method runs on the thread that seized it."""

    def __init__(self, pid: int, deadline: float) -> None:
        self.pid = pid
        self.deadline = deadline
        self.signals: list[int] = []  # signals that arrived while we held it: handed back at detach
        self.gone = False

    def wait_stop(self, want_trap: bool) -> None:
        """Wait for a ptrace stop. want_trap: the stop must be a SIGTRAP (our INTERRUPT or SINGLESTEP)."""
        while True:
            status = self._wait(block=False)
            if status is None:
                if time.monotonic() > self.deadline:
                    raise TimeoutError
                time.sleep(0.0005)
                continue
            if self._classify(status, want_trap):
                return

    def wait_stop_forever(self) -> None:
        """After a timeout: the INTERRUPT is still pending, so the process stops eventually; wait for it."""
        while True:
            status = self._wait(block=True)
            if status is not None and self._classify(status, want_trap=True):
                return

    def _wait(self, block: bool) -> int | None:
        try:
            pid, status = os.waitpid(self.pid, WALL | (0 if block else os.WNOHANG))
        except ChildProcessError as err:
            self.gone = True
            raise InjectError(f"pid {self.pid} vanished while traced", changed=False) from err
        return status if pid else None

    def _classify(self, status: int, want_trap: bool) -> bool:
        """True for the stop we wait for; remembers other signals; raises if the process ended."""
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.gone = True
            raise InjectError(f"pid {self.pid} exited while traced")
        if not os.WIFSTOPPED(status):
            return False
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if not want_trap and event == PTRACE_EVENT_STOP:
            return True  # our interrupt (or a group stop, which holds the process just as well)
        if want_trap and event == 0 and sig == signal.SIGTRAP:
            return True  # the single step is done
        if event == 0:
            # A signal-delivery stop for a signal the process was sent meanwhile: keep it for the
            # detach and let the process go on (suppressed) to the stop we asked for.
            self.signals.append(sig)
        _ptrace(PTRACE_SINGLESTEP if want_trap else PTRACE_CONT, self.pid, 0, None)
        return False

    def detach(self) -> None:
        if self.gone:
            return
        first = self.signals[0] if self.signals else 0
        try:
            _ptrace(PTRACE_DETACH, self.pid, 0, ctypes.c_void_p(first))
        except OSError as err:
            if err.errno != errno.ESRCH:
                raise
        for sig in self.signals[1:]:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


def run_syscalls(pid: int, calls: Sequence[Syscall], timeout_s: float, insn: int | None = None,
                 check: Callable[[], str | None] | None = None) -> list[int]:
    """Run `calls` one after the other inside `pid`; returns each call's result (>= 0).

    Raises InjectError: with changed=False when the process was left exactly as it was (nothing ran),
    changed=True when some calls had run (`done`) before one failed. The registers are always restored.
    `check`, called once the process is stopped and before anything is changed, may veto with a reason.
    `insn` pins the address of the syscall instruction (tests); normally one is looked up.
    """
    why = supported()
    if why:
        raise InjectError(why)
    reason = procfs.paused(pid)
    if reason is not None:
        raise InjectError(f"pid {pid} is {reason}: not touching it")
    if not procfs.alive(pid):
        # Gone, or a thread-group leader that exited while other threads run on: it never stops for ptrace.
        raise InjectError(f"pid {pid} has exited (or its main thread has): not touching it")
    address = insn if insn is not None else find_syscall_insn(pid)
    deadline = time.monotonic() + timeout_s
    try:
        _ptrace(PTRACE_SEIZE, pid, 0, None)
    except OSError as err:
        raise InjectError(f"cannot trace pid {pid} ({err.strerror}): is another tracer (CRIU, a debugger) "
                          "attached?") from err
    tracee = _Tracee(pid, deadline)
    results: list[int] = []
    saved: Regs | None = None
    try:
        _ptrace(PTRACE_INTERRUPT, pid, 0, None)
        try:
            tracee.wait_stop(want_trap=False)
        except TimeoutError:
            tracee.wait_stop_forever()
            raise InjectError(f"pid {pid} did not stop within {timeout_s:.3g} s (uninterruptible sleep?); "
                              "left as it was") from None
        saved = _getregs(pid)
        veto = check() if check is not None else None
        if veto is not None:
            raise InjectError(f"pid {pid}: {veto}; left as it was")
        if _read_code(pid, address) != SYSCALL_INSN:
            raise InjectError(f"pid {pid}: no syscall instruction at {address:#x}; left as it was")
        for call in calls:
            regs = Regs.from_buffer_copy(saved)
            regs.rip = address
            regs.rax = call.nr
            regs.orig_rax = (1 << 64) - 1  # -1: not in a syscall, so no restart logic touches these registers
            regs.rdi = call.args[0] if call.args else 0
            regs.rsi = call.args[1] if len(call.args) > 1 else 0
            _setregs(pid, regs)
            _ptrace(PTRACE_SINGLESTEP, pid, 0, None)
            try:
                tracee.wait_stop(want_trap=True)
            except TimeoutError:
                tracee.wait_stop_forever()
            after = _getregs(pid)
            if after.rip != address + len(SYSCALL_INSN):
                raise InjectError(f"pid {pid}: {call.label}: the injected syscall did not complete "
                                  f"(rip {after.rip:#x})", changed=bool(results),
                                  done=[c.label for c in calls[:len(results)]])
            value = ctypes.c_longlong(after.rax).value
            if value < 0:
                raise InjectError(f"pid {pid}: {call.label} failed: {os.strerror(-value)}", changed=bool(results),
                                  done=[c.label for c in calls[:len(results)]])
            results.append(value)
        return results
    except OSError as err:
        raise InjectError(f"pid {pid}: ptrace failed: {err}", changed=bool(results),
                          done=[c.label for c in calls[:len(results)]]) from err
    finally:
        if saved is not None and not tracee.gone:
            try:
                _setregs(pid, saved)
            except OSError:
                pass  # it died meanwhile
        tracee.detach()
