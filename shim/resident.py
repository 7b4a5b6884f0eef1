"""kybernate-shimd: a resident, pre-imported process that runs the shim's commands in forked workers.

Every `containerd-shim-kybernate-v1 start|delete|-info` (shim/client.py, shim/native/shim_client.c) connects
here and passes its argv, cwd, environment and its stdin/stdout/stderr. A worker takes over those fds,
environment and cwd and runs the command exactly as shim/cli.py would in a fresh process, but with every
module already imported. Workers are forked ahead (spares, each waiting on a control socket of its own): the
resident accepts, passes the connection's fd to a spare and goes back to waiting, so no command waits for a
fork; the spare is replaced right after the hand-off, while the client waits on its worker. The resident
itself never runs a command, so a crash in one command costs one worker.

A new pod's `start` carries on in its worker as that pod's shim daemon once it has answered (no second fork;
shim/manager.py start_for_this_process): one process per pod, which does not depend on the resident, so pods
keep running when the resident dies, is restarted or is upgraded (it reaps them while it lives). Spares hold
nothing of the resident but their control socket: when the resident goes, they read EOF and exit. Without
the resident the client runs the command itself (the slow path) and logs that once.

The resident must stay single-threaded (it forks) and runs no event loop of its own.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import select
import signal
import socket
import struct
import sys

# Pre-imported on purpose: these are what every start, delete and pod daemon would otherwise import.
from . import cli, client, manager, passlane, phases, title
from . import daemon as _daemon  # noqa: F401 - asyncio, the task service, protobuf, ttrpc
from . import runtime_options as _runtime_options  # noqa: F401 - protobuf, tomllib

log = logging.getLogger("kybernate.shim.resident")

# Bytes of argv the resident keeps for its workers' command lines (see set_title).
TITLE_ROOM = 4096
_REEXEC_ENV = "KYBERNATE_SHIMD_TITLE_ROOM"
MAX_WORKERS = 64
# A worker waits this long for its client's request; a client that never sends one costs one worker.
REQUEST_TIMEOUT_S = 10.0
ACCEPT_POLL_S = 0.5
_STATE_DIR_AT_IMPORT = manager.GROUP_STATE_DIR


class ResidentError(RuntimeError):
    """The resident cannot serve; the message says what to do."""


# ---- the workers' command line ------------------------------------------------------------------


def ensure_title_room(argv: list[str]) -> None:
    """Re-exec once with empty padding arguments if argv is too short to hold a worker's command line."""
    if title.room() >= TITLE_ROOM or os.environ.get(_REEXEC_ENV):
        return
    os.environ[_REEXEC_ENV] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "kybernate.shim.resident", *argv, *[""] * TITLE_ROOM])


# ---- the resident ---------------------------------------------------------------------------------


def bind(path: str) -> socket.socket:
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise ResidentError(f"another kybernate-shimd already listens on {path}")
        except OSError:
            os.unlink(path)  # left by a resident that died
        finally:
            probe.close()
    os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(128)
    return listener


def memory_kib() -> dict[str, int]:
    """Resident and proportional set size of this process (Pss counts pages shared with forks once)."""
    found = {}
    for name, key in (("/proc/self/status", "VmRSS:"), ("/proc/self/smaps_rollup", "Pss:")):
        try:
            with open(name) as f:
                line = next((x for x in f if x.startswith(key)), "")
            found[key.rstrip(":").lower()] = int(line.split()[1]) if line else -1
        except OSError:
            found[key.rstrip(":").lower()] = -1
    return found


class Pool:
    """The resident's workers: spares (forked ahead, idle, each on its own control socket) and busy ones.

    A connection goes to a spare (its fd passed over the control socket: no fork on the command's path);
    only when none is left is a worker forked for it. A worker says `D` (or closes its control socket)
    once it has answered; a new pod's `start` then carries on in that same process as the pod's daemon
    (shim/manager.py, daemon_in_this_process), which the resident reaps when the pod ends.

    A spare handed out is replaced at once (refill), while the client waits on its worker: containerd is
    blocked on that command then, so the fork (~1 ms here, ~3 ms of the child's CPU) overlaps the command
    instead of landing in the pod's next CRI call, as it did when spares were forked only after QUIET_S of
    quiet (StartContainer on containerd 2.1, docs/benchmarks.md). What the refill could not fork (a spare
    died, max_workers reached) is forked when the resident has been quiet for QUIET_S.
    """

    def __init__(self, listener: socket.socket, max_workers: int, spares: int) -> None:
        self.listener = listener
        self.max_workers = max_workers
        self.spares_wanted = min(spares, max_workers)
        self.spares: dict[int, socket.socket] = {}  # pid -> the resident's end of its control socket
        self.busy: dict[int, socket.socket] = {}

    def in_flight(self) -> int:
        return len(self.spares) + len(self.busy)

    def fork(self) -> None:
        """One more spare: an idle worker waiting on its control socket."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the worker would write our buffered lines into containerd's pipe
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # Nothing of the resident's may stay open here: a spare must see EOF when the resident goes,
                # and a pod daemon must not keep the resident's socket alive.
                self.listener.close()
                for other in [*self.spares.values(), *self.busy.values(), ours]:
                    other.close()
                code = spare(theirs)
            except BaseException:  # noqa: BLE001 - a worker never returns into the resident's loop
                log.exception("worker failed")
            finally:
                os._exit(code)
        theirs.close()
        self.spares[pid] = ours

    def hand(self, conn: socket.socket) -> None:
        """Give `conn` to a spare; when none is left, fork one for it (what every command cost before)."""
        while True:
            if not self.spares:
                self.fork()
            pid, control = self.spares.popitem()
            try:
                socket.send_fds(control, [b"C"], [conn.fileno()])
            except OSError:
                control.close()  # that spare died: the next one, or a fork
                continue
            conn.close()
            self.busy[pid] = control
            return

    def refill(self) -> None:
        """Fork the spares missing, as far as max_workers allows."""
        while len(self.spares) < self.spares_wanted and self.in_flight() < self.max_workers:
            self.fork()

    def heard(self, control: socket.socket) -> None:
        """A busy worker answered (`D`) or went (EOF), or a spare died: it no longer counts."""
        for group in (self.busy, self.spares):
            pid = next((p for p, c in group.items() if c is control), None)
            if pid is not None:
                del group[pid]
        control.close()

    def reap(self) -> None:
        """Collect exited workers and pod daemons (a worker that carried on as one is still our child)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            spare_control = self.spares.pop(pid, None)
            if spare_control is not None:
                spare_control.close()

    def close(self) -> None:
        for control in self.spares.values():
            control.close()  # each spare sees EOF and exits
        self.spares.clear()


# With nothing to do for this long, the resident forks its missing spares.
QUIET_S = 0.1
SPARES = 2


def serve(listener: socket.socket, max_workers: int = MAX_WORKERS, spares: int = SPARES) -> None:
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, frame: stopping.append(signum))
    listener.setblocking(False)
    pool = Pool(listener, max_workers, spares)
    pool.refill()  # ready before the first command
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    watched: dict[int, socket.socket] = {}
    while not stopping:
        pool.reap()
        for fd in [fd for fd, c in watched.items() if c.fileno() < 0]:
            poller.unregister(fd)
            del watched[fd]
        for control in [*pool.spares.values(), *pool.busy.values()]:
            if control.fileno() not in watched:
                watched[control.fileno()] = control
                poller.register(control, select.POLLIN)
        full = pool.in_flight() >= max_workers
        if full:
            poller.modify(listener, 0)
        try:
            events = poller.poll((QUIET_S if len(pool.spares) < pool.spares_wanted else ACCEPT_POLL_S) * 1000)
        except InterruptedError:
            events = []
        if full:
            poller.modify(listener, select.POLLIN)
        if not events:
            pool.refill()
            continue
        for fd, _ in events:
            if fd == listener.fileno():
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                conn.setblocking(True)
                pool.hand(conn)
                pool.refill()
            elif fd in watched:
                control = watched.pop(fd)
                poller.unregister(fd)
                if control.fileno() >= 0:
                    pool.heard(control)
    log.info("stopping", extra={"fields": {"signal": stopping[0], "workers_in_flight": len(pool.busy)}})
    pool.close()


def spare(control: socket.socket) -> int:
    """A worker forked ahead: wait for the resident to hand it a connection, then serve it like any worker."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    try:
        _, fds, _, _ = socket.recv_fds(control, 16, 1)
    except OSError:
        return 0
    if not fds:
        return 0  # the resident stopped or died
    return work(socket.socket(fileno=fds[0]), control)


# ---- one worker -----------------------------------------------------------------------------------


def receive(conn: socket.socket) -> tuple[list[int], list[str], str, dict[str, str]]:
    """The client's fds, argv, cwd and environment; ValueError if it is not a request we understand."""
    fd_size = struct.calcsize("i")
    data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fd_size))
    if not data and not ancdata:
        raise EOFError("closed without a request")  # a liveness probe: connect, close
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i : i + fd_size], sys.byteorder) for i in range(0, len(payload), fd_size)]
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected stdin, stdout and stderr, got {len(fds)} fds")
    if len(data) < 8:
        raise ValueError("short request")
    size = int.from_bytes(data[:8], "big")
    if size > client.MAX_REQUEST:
        raise ValueError(f"request of {size} bytes is over the limit")
    body = data[8:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("request cut short")
        body += chunk
    argv, cwd, env = client.decode(body)
    return fds, argv, cwd, env


def work(conn: socket.socket, control: socket.socket | None = None) -> int:
    """Run one command as the client's process would have, then send its exit status; a new pod's `start`
    then carries on here as that pod's daemon. `control`: tell the resident when the answer is out."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    phases.reset()
    conn.settimeout(REQUEST_TIMEOUT_S)
    uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
    if uid != os.getuid():
        log.warning("refused a client of another user", extra={"fields": {"uid": uid}})
        return 1
    try:
        fds, argv, cwd, env = receive(conn)
    except EOFError:
        return 0
    except (OSError, ValueError) as err:
        log.warning("bad request", extra={"fields": {"error": str(err)}})
        return 1
    phases.mark("request")
    # From here stdout and stderr are the client's: nothing of ours may be written there.
    logging.getLogger().handlers.clear()
    for target, fd in zip((0, 1, 2), fds, strict=True):  # exactly three: checked when the request was read
        os.dup2(fd, target)
        os.close(fd)
    # A pod daemon `start` forks must not keep the client's connection open (one without the resident).
    os.register_at_fork(after_in_child=conn.close)
    manager.DAEMON_IN_THIS_PROCESS = True
    try:
        os.chdir(cwd)
        # Only what differs: each unsetenv/putenv walks the whole environment, and most of it is the same.
        for key in [k for k in os.environ if k not in env]:
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        # Read at import time in the resident; the client's (containerd's) environment decides here.
        manager.GROUP_STATE_DIR = env.get("KYBERNATE_SHIM_STATE_DIR", _STATE_DIR_AT_IMPORT)
        title.set_title(argv)
        phases.mark("worker")
        code = cli.main(argv[1:])
    except Exception as err:  # noqa: BLE001 - cli.main answers its own errors; this is what comes before it
        sys.stderr.write(f"containerd-shim-kybernate-v1 (kybernate-shimd worker): {err}\n")
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        # containerd reads the command's stdout and stderr to EOF: let go of them before the client is told
        # (it exits at once), not whenever this process next gets a CPU.
        devnull = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(devnull, target)
        os.close(devnull)
    conn.settimeout(REQUEST_TIMEOUT_S)
    try:
        conn.sendall(b"%d\n" % code)
    except OSError:
        pass  # the client is gone: containerd gave up on this command
    conn.close()
    if control is not None:
        try:
            control.send(b"D")
        except OSError:
            pass  # the resident is gone: nothing to tell
        control.close()
    # A new pod's start: its daemon is this process from here (no fork on the pod's start path).
    return manager.run_pending_daemon()


# ---- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args_in = [a for a in (sys.argv[1:] if argv is None else argv) if a]  # drop ensure_title_room's padding
    parser = argparse.ArgumentParser(prog="kybernate-shimd", description=__doc__.split("\n")[0])
    parser.add_argument("--socket", default=client.resident_socket(),
                        help=f"default: ${client.SOCKET_ENV} or {client.DEFAULT_SOCKET}")
    parser.add_argument("--max-workers", type=int, default=MAX_WORKERS)
    parser.add_argument("--spares", type=int, default=SPARES,
                        help="idle workers forked ahead, so that a command does not wait for a fork [%(default)s]")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(args_in)
    if args.max_workers < 1:
        parser.error("--max-workers must be at least 1")
    if args.spares < 0:
        parser.error("--spares must be 0 or more")
    if argv is None:
        ensure_title_room(args_in)
    from kybernate.hooks.api.logs import setup as setup_logs

    setup_logs(args.log_level)
    try:
        listener = bind(args.socket)
    except (ResidentError, OSError) as err:
        log.error("cannot listen", extra={"fields": {"socket": args.socket, "error": str(err)}})
        return 1
    try:
        os.unlink(args.socket + client.FALLBACK_MARK_SUFFIX)  # the next absence gets logged again
    except FileNotFoundError:
        pass
    log.info("ready", extra={"fields": {"socket": args.socket, "pid": os.getpid(), "title_room": title.room(),
                                        **{f"{k}_kib": v for k, v in memory_kib().items()}}})
    title.remember_area()
    try:
        passlane.load()  # dlopen once here, not in every pod daemon
    except OSError as err:
        log.warning("pass lane not loaded; pod daemons serve every call in Python",
                    extra={"fields": {"error": str(err)}})
    # Everything imported so far lives as long as the process: keep the collector off those pages, so
    # that workers and pod daemons share them copy-on-write instead of copying them on the first GC.
    gc.freeze()
    try:
        serve(listener, args.max_workers, args.spares)
    finally:
        listener.close()
        try:
            os.unlink(args.socket)
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
