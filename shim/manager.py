"""The shim binary's own lifecycle: `start`, `delete` and `-info`. Nothing here serves RPCs.

`start` binds our socket, forks our daemon on it (no re-exec: the interpreter and imports are already paid
for), runs the stock runc shim's own `start` (which forks the runc shim daemon, our child) while that
daemon comes up, hands it the child's address through a pipe, rewrites `bundle/address` to ours and prints
our address. `delete` cleans up after a dead shim the way the runc
shim does, and also stops a runc shim left behind when our daemon was killed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

from . import phases
from .cli import ShimArgs
from .ttrpc.address import socket_path

if TYPE_CHECKING:
    from .daemon import DaemonConfig
    from .runtime_options import RuntimeConfig

# This module is on every container's start and delete path: it avoids dataclasses, pathlib and
# shutil (~15 ms of imports together) and imports protobuf only when options need converting.

RUNC_SHIM_BINARY = "containerd-shim-runc-v2"
# Where containerd's shims put their sockets, whatever containerd's --state says.
SOCKET_DIR = "/run/containerd/s"
# Per-group record of our daemon and its child, so `delete` can clean up after a killed daemon.
GROUP_STATE_DIR = os.environ.get("KYBERNATE_SHIM_STATE_DIR", "/run/kybernate/shims")
GROUP_LABELS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
CHILD_START_TIMEOUT_S = 30.0
# Where containerd's shims publish their events (containerd's ttrpc socket); the child gets ours.
TTRPC_ADDRESS_ENV = "TTRPC_ADDRESS"
# Set by kybernate-shimd's workers (shim/resident.py): a new pod's daemon is the worker process itself, which
# carries on as it after answering (run_pending_daemon) instead of forking one on the pod's start path.
DAEMON_IN_THIS_PROCESS = False
_pending_daemon: list[tuple[DaemonConfig, socket.socket]] = []


class StartError(RuntimeError):
    """The shim could not be started; the message says which step failed."""


class ChildShim:
    """The runc shim we started: its socket and which task API it serves (2 or 3)."""

    __slots__ = ("address", "task_api")

    def __init__(self, address: str, task_api: int) -> None:
        self.address = address
        self.task_api = task_api

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChildShim) and (self.address, self.task_api) == (other.address, other.task_api)

    def __repr__(self) -> str:
        return f"ChildShim(address={self.address!r}, task_api={self.task_api})"


class GroupState:
    """What `delete` needs to know about a group's daemons after ours was killed."""

    FIELDS = ("namespace", "group", "address", "child_address", "child_task_api")
    __slots__ = FIELDS

    def __init__(self, namespace: str, group: str, address: str, child_address: str, child_task_api: int) -> None:
        self.namespace = namespace
        self.group = group
        self.address = address
        self.child_address = child_address
        self.child_task_api = child_task_api

    @staticmethod
    def path_for(address: str) -> str:
        return os.path.join(GROUP_STATE_DIR, os.path.basename(socket_path(address)) + ".json")

    def save(self) -> None:
        os.makedirs(GROUP_STATE_DIR, mode=0o700, exist_ok=True)
        path = self.path_for(self.address)
        with open(path + ".tmp", "w") as f:
            json.dump({k: getattr(self, k) for k in self.FIELDS}, f)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, address: str) -> GroupState | None:
        try:
            with open(cls.path_for(address)) as f:
                data = json.load(f)
            # Fields beyond ours (an older shim's daemon_pid) are ignored.
            return cls(**{k: data[k] for k in cls.FIELDS})
        except (OSError, ValueError, TypeError, KeyError):
            return None

    @classmethod
    def remove(cls, address: str) -> None:
        for path in (cls.path_for(address), alive_path(address)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def read_spec(bundle: str) -> dict[str, object]:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            spec = json.load(f)
    except OSError as err:
        raise StartError(f"cannot read the OCI spec {path}: {err.strerror}") from err
    except ValueError as err:
        raise StartError(f"the OCI spec {path} is not valid JSON: {err}") from err
    if not isinstance(spec, dict):
        raise StartError(f"the OCI spec {path} is not a JSON object")
    return spec


def spec_annotations(spec: dict[str, object]) -> dict[str, str]:
    found = spec.get("annotations") or {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def group_id(spec: dict[str, object], container_id: str) -> str:
    """Containers of one pod share one shim, exactly as the runc shim groups them."""
    notes = spec_annotations(spec)
    for label in GROUP_LABELS:
        if notes.get(label):
            return notes[label]
    return container_id


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    # Hashed like the runc shim's name but over a different input, so the two never collide.
    digest = hashlib.sha256(f"{containerd_address}/{namespace}/{group}/kybernate".encode()).hexdigest()
    return f"unix://{SOCKET_DIR}/{digest}"


def can_connect(address: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(socket_path(address))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def remove_socket(address: str) -> None:
    try:
        os.unlink(socket_path(address))
    except FileNotFoundError:
        pass


def write_address(bundle: str, address: str) -> None:
    # containerd 1.6/1.7 reconnect from this file after a restart; write it atomically.
    tmp = os.path.join(bundle, ".address.kybernate")
    with open(tmp, "w") as f:
        f.write(address)
    os.replace(tmp, os.path.join(bundle, "address"))


def find_runc_shim() -> str:
    configured = os.environ.get("KYBERNATE_RUNC_SHIM")
    if configured:
        return configured
    found = next(
        (
            candidate
            for directory in os.environ.get("PATH", "").split(os.pathsep)
            if directory and os.access(candidate := os.path.join(directory, RUNC_SHIM_BINARY), os.X_OK)
        ),
        None,
    )
    if not found:
        raise StartError(
            f"{RUNC_SHIM_BINARY} is not on containerd's PATH; install containerd's runc shim "
            "or set KYBERNATE_RUNC_SHIM to its path"
        )
    return found


def parse_child_start_output(output: bytes) -> ChildShim:
    """The runc shim prints a bare address (containerd 1.6/1.7) or JSON bootstrap params (2.x)."""
    text = output.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            params = json.loads(text)
            return ChildShim(address=str(params["address"]), task_api=int(params.get("version", 2)))
        except (ValueError, KeyError, TypeError) as err:
            raise StartError(f"runc shim printed unreadable bootstrap params {text!r}: {err}") from err
    if not text.startswith("unix://") or "\n" in text:
        raise StartError(f"runc shim start did not print an address: {text!r}")
    return ChildShim(address=text, task_api=2)


def run_child(runc_shim: str, args: list[str], bundle: str, stdin: bytes) -> bytes:
    try:
        done = subprocess.run(
            [runc_shim, *args],
            cwd=bundle,
            input=stdin,
            capture_output=True,
            timeout=CHILD_START_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise StartError(f"{runc_shim} {args[-1]} did not finish within {CHILD_START_TIMEOUT_S:.0f}s") from err
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).decode("utf-8", errors="replace").strip()
        raise StartError(f"{runc_shim} {args[-1]} failed (exit {done.returncode}): {detail}")
    return done.stdout


def convert_options(stdin: bytes) -> RuntimeConfig:
    """The options containerd gave us (or the node's defaults), validated before anything starts."""
    from . import runtime_options

    try:
        return runtime_options.from_any_bytes(stdin)
    except runtime_options.OptionsError as err:
        raise StartError(str(err)) from err


def start(args: ShimArgs, stdin: bytes) -> str:
    bundle = args.bundle or os.getcwd()
    spec = read_spec(bundle)
    group = group_id(spec, args.id)
    address = socket_address(args.address, args.namespace, group)
    phases.mark("spec")
    if can_connect(address):
        write_address(bundle, address)
        phases.mark("joined")
        return address
    remove_socket(address)

    runc_shim = find_runc_shim()
    # Bad options must fail before anything is started.
    runtime_config = convert_options(stdin)
    phases.mark("options")
    # Our socket is bound and listening before the runc shim starts (a connection that comes early waits in
    # the backlog), so the child can be given its address. In a kybernate-shimd worker, this process becomes
    # the daemon after answering; otherwise the daemon is forked now and its imports, event loop and log
    # come up while the runc shim starts, instead of after it.
    listener = bind_socket(address)
    hold_alive_lock(address)
    if DAEMON_IN_THIS_PROCESS:
        return start_for_this_process(args, group, address, bundle, runc_shim, runtime_config, listener)
    handoff = fork_daemon(args, group, address, bundle, runtime_config, listener)
    phases.mark("daemon_forked")
    try:
        child_shim = start_child(runc_shim, args, bundle, runtime_config, address)
    except BaseException:
        os.close(handoff)  # the daemon sees EOF and exits without touching anything
        remove_socket(address)
        drop_alive_lock(address)
        raise
    phases.mark("runc_start")
    # Recorded before the daemon is told: once it has the child, `delete` may need this to find it.
    state = GroupState(args.namespace, group, address, child_shim.address, child_shim.task_api)
    try:
        state.save()
        hand_over(handoff, child_shim)
    except OSError as err:
        remove_socket(address)
        stop_child_shim(child_shim.address)  # nothing would ever talk to it
        GroupState.remove(address)
        drop_alive_lock()
        raise StartError(f"cannot hand the runc shim to our shim daemon: {err}") from err
    finally:
        os.close(handoff)
    drop_alive_lock()  # the daemon holds it now
    write_address(bundle, address)
    phases.mark("handed_over")
    return address


def start_for_this_process(
    args: ShimArgs, group: str, address: str, bundle: str, runc_shim: str, runtime_config: RuntimeConfig,
    listener: socket.socket,
) -> str:
    """`start` in a kybernate-shimd worker: the runc shim, then this process becomes the daemon once it has
    answered (run_pending_daemon). No fork, and the daemon's modules are imported already."""
    from . import daemon

    try:
        child_shim = start_child(runc_shim, args, bundle, runtime_config, address)
    except BaseException:
        listener.close()
        remove_socket(address)
        drop_alive_lock(address)
        raise
    phases.mark("runc_start")
    state = GroupState(args.namespace, group, address, child_shim.address, child_shim.task_api)
    try:
        state.save()
        write_address(bundle, address)
    except OSError as err:
        listener.close()
        remove_socket(address)
        stop_child_shim(child_shim.address)  # nothing would ever talk to it
        GroupState.remove(address)
        drop_alive_lock()
        raise StartError(f"cannot record the shim daemon's state: {err}") from err
    config = daemon.DaemonConfig(
        namespace=args.namespace, group=group, address=address, bundle=str(bundle),
        child_address=child_shim.address, child_task_api=child_shim.task_api, debug=args.debug,
        runtime=runtime_config, events_address=os.environ.get(TTRPC_ADDRESS_ENV, ""),
    )
    _pending_daemon.append((config, listener))
    return address


def run_pending_daemon() -> int:
    """After a worker's answer is out: serve as the pod's daemon if its `start` left one to run, else 0."""
    if not _pending_daemon:
        return 0
    config, listener = _pending_daemon.pop()
    detach_from_caller()
    from . import daemon

    return daemon.run(config, listener)


def child_env(address: str) -> dict[str, str]:
    """The runc child publishes its events to our daemon, which forwards them to containerd (shim/events.py):
    so a hibernated task's exit never reaches containerd. Our socket is bound and listening before the child
    starts, so its first event (TaskCreate, after Create) waits in the backlog at worst."""
    env = dict(os.environ)
    if env.get(TTRPC_ADDRESS_ENV):  # without one (containerd gives it always) our daemon has nowhere to forward
        env[TTRPC_ADDRESS_ENV] = socket_path(address)  # a bare path, as containerd gives its own
    return env


def start_child(runc_shim: str, args: ShimArgs, bundle: str, runtime_config: RuntimeConfig,
                address: str) -> ChildShim:
    """Run the runc shim's own `start` (it forks the runc shim daemon, our child) and read its address."""
    child = subprocess.Popen(
        [runc_shim, *args.child_flags(), "start"],
        cwd=bundle, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=child_env(address),
    )
    try:
        out, err = child.communicate(runtime_config.runc_any_bytes(), timeout=CHILD_START_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        child.kill()
        child.wait()
        raise StartError(f"{runc_shim} start did not finish within {CHILD_START_TIMEOUT_S:.0f}s") from exc
    if child.returncode != 0:
        detail = (err or out).decode("utf-8", errors="replace").strip()
        raise StartError(f"{runc_shim} start failed (exit {child.returncode}): {detail}")
    return parse_child_start_output(out)


def fork_daemon(
    args: ShimArgs, group: str, address: str, bundle: str, runtime_config: RuntimeConfig, listener: socket.socket
) -> int:
    """Fork our shim daemon on `listener`; the returned pipe hands it the runc shim (hand_over) or, closed
    without a word, tells it to exit: the listener is always closed here."""
    try:
        readable, handoff = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(readable)
            os.close(handoff)
            raise
    except OSError as err:
        listener.close()
        remove_socket(address)
        drop_alive_lock(address)
        raise StartError(f"cannot start the shim daemon: {err}") from err
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(handoff)
            detach_from_caller()
            # Imported here, not before the fork: without kybernate-shimd, this import (asyncio, the task
            # service, protobuf) runs in the daemon while its parent starts the runc shim.
            from . import daemon

            config = daemon.DaemonConfig(
                namespace=args.namespace, group=group, address=address, bundle=str(bundle),
                child_address="", child_task_api=0, debug=args.debug, runtime=runtime_config,
                events_address=os.environ.get(TTRPC_ADDRESS_ENV, ""),
            )
            code = daemon.run_handed_over(config, listener, readable)
        finally:
            os._exit(code)
    os.close(readable)
    listener.close()
    return handoff


# What hand_over writes: `<task api> <address>` (a few hundred bytes at most, one write: atomic on a pipe).
HANDOFF_MAX = 4096


def hand_over(handoff: int, child: ChildShim) -> None:
    data = f"{child.task_api} {child.address}".encode()
    if len(data) > HANDOFF_MAX or os.write(handoff, data) != len(data):
        raise OSError(f"runc shim address of {len(data)} bytes cannot be handed over")


def parse_handoff(data: bytes) -> ChildShim | None:
    """hand_over's message; None for anything else (EOF: the start failed and the daemon must go)."""
    api, _, address = data.decode("utf-8", errors="replace").partition(" ")
    if not api.isdigit() or not address.startswith("unix://"):
        return None
    return ChildShim(address=address, task_api=int(api))


# The pod daemon's exclusive flock on <GROUP_STATE_DIR>/<socket name>.alive, held for as long as it lives: the
# native client's `start` of a pod's later container tests it (LOCK_SH|LOCK_NB) to know the daemon is there
# without connecting to it, which cost the daemon an accept and a connection on containerd's path
# (docs/benchmarks.md, StartContainer on 2.1). The kernel drops the lock when the daemon dies.
ALIVE_SUFFIX = ".alive"
_alive_fds: list[int] = []  # never closed: the lock must last as long as this process


def alive_path(address: str) -> str:
    return os.path.join(GROUP_STATE_DIR, os.path.basename(socket_path(address)) + ALIVE_SUFFIX)


def hold_alive_lock(address: str) -> None:
    """Take the group's alive lock for this process and the daemon it becomes or forks (the fd is inherited
    by a fork, closed by an exec). Without it (an error, or held by another process) the native client finds
    no live daemon and hands the join to the Python path, which connects: slower, never wrong."""
    try:
        os.makedirs(GROUP_STATE_DIR, mode=0o700, exist_ok=True)
        fd = os.open(alive_path(address), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return
    _alive_fds.append(fd)


def drop_alive_lock(address: str | None = None) -> None:
    """Close this process's alive-lock fds (a daemon forked from it keeps its own); with `address`, also
    remove the file: the start failed and no daemon holds it."""
    while _alive_fds:
        os.close(_alive_fds.pop())
    if address is not None:
        try:
            os.unlink(alive_path(address))
        except FileNotFoundError:
            pass


def bind_socket(address: str) -> socket.socket:
    path = socket_path(address)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(128)
    except OSError as err:
        listener.close()
        raise StartError(f"cannot listen on {path}: {err.strerror or err}") from err
    return listener


def detach_from_caller() -> None:
    """containerd reads start's stdout and stderr to EOF: the daemon must hold neither."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def delete(args: ShimArgs) -> bytes:
    """Clean up after a dead shim and print the runc shim's DeleteResponse."""
    bundle = args.bundle or os.getcwd()
    try:
        group = group_id(read_spec(bundle), args.id)
    except StartError:
        group = args.id
    address = socket_address(args.address, args.namespace, group)
    if not can_connect(address):
        stop_orphaned_child(address)
    phases.mark("orphans")
    answer = run_child(find_runc_shim(), [*args.child_flags(), "delete"], bundle, b"")
    phases.mark("runc_delete")
    return answer


def stop_orphaned_child(address: str) -> None:
    """Our daemon is gone: stop the runc shim it started, which would otherwise run on unseen."""
    state = GroupState.load(address)
    remove_socket(address)
    if state is not None:
        stop_child_shim(state.child_address)
    GroupState.remove(address)


def stop_child_shim(child_address: str) -> None:
    """Kill the runc shim daemon serving `child_address` and remove every socket it listened on.

    It is found by the socket it listens on rather than by a recorded pid, which may have been reused.
    """
    from kybernate.hooks.api import procfs  # the delete path only: it imports pathlib and dataclasses

    unix_table = procfs.unix_sockets()
    wanted = {inode for inode, path in unix_table.items() if path == socket_path(child_address)}
    for pid, inodes in procfs.socket_inodes_by_pid().items():
        if not inodes & wanted:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        # Its debug socket too (containerd passes -debug when it logs at debug level).
        for inode in inodes:
            path = unix_table.get(inode, "")
            if path.startswith(SOCKET_DIR + "/"):
                remove_socket(path)
    remove_socket(child_address)


def info(args: ShimArgs, stdin: bytes) -> bytes:
    """`-info`: the runc shim answers, given options it can read."""
    child_stdin = convert_options(stdin).runc_any_bytes()
    flags = ["-debug"] if args.debug else []
    runc_shim = find_runc_shim()
    done = subprocess.run(
        [runc_shim, *flags, "-info"], input=child_stdin, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise StartError(f"{runc_shim} -info failed: {done.stderr.decode(errors='replace').strip()}")
    sys.stderr.flush()
    return done.stdout
