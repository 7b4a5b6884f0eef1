"""A private containerd (1.6 or 2.1) per test: its own root, state, sockets, CNI network and runc root.

Several engineers and test runs share one machine, so nothing here may touch another instance: the
directory, the ctr namespace, the bridge and the subnet are all derived from a random instance id, and
stop() only kills processes that carry this instance's socket address (or live in its cgroups).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from kybernate.hooks.api import procfs

from .cri import CriClient
from .images import PAUSE_IMAGE
from .stack import Stack

# Unix socket paths must stay under 108 bytes: a short fixed base, not pytest's long tmp paths.
RUN_BASE = Path("/run/kyb-test")
CRI_NAMESPACE = "k8s.io"
# Where the kybernate shim keeps one record per shim daemon (shim/manager.py, GROUP_STATE_DIR).
KYBERNATE_SHIM_STATE_DIR = Path("/run/kybernate/shims")
# Default runc root of the runc shim for containers not created through CRI (ctr run, ctr restore).
_DEFAULT_RUNC_ROOT = Path("/run/containerd/runc")
# Where ctr puts IO fifos unless told otherwise (--fifo-dir).
_DEFAULT_FIFO_DIR = Path("/run/containerd/fifo")
_MNT_DETACH = 2


class CtrError(subprocess.CalledProcessError):
    """A failed ctr call; str() carries the command and what ctr said."""

    def __str__(self) -> str:
        said = self.stderr.strip() or self.stdout.strip()
        return f"{' '.join(map(str, self.cmd))} exited {self.returncode}: {said}"


class Containerd:
    """One private containerd. Construct, then start(); always stop() (the fixtures do)."""

    def __init__(
        self,
        stack: Stack,
        version: str,
        *,
        extra_path: Sequence[str | Path] = (),
        extra_config: str = "",
        env: Mapping[str, str] | None = None,
        log_level: str = "debug",
        netns: str | None = None,
        mntns: Path | None = None,
    ) -> None:
        if version not in stack.containerd:
            raise ValueError(f"containerd {version!r} is not in the stack (have {sorted(stack.containerd)})")
        self.stack = stack
        self.version = version
        self.binaries = stack.containerd[version]
        self.id = secrets.token_hex(4)
        self.dir = RUN_BASE / self.id
        self.address = self.dir / "c.sock"
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.runc_root = self.dir / "runc"
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        # A namespace of its own: ctr-made containers then get their own cgroups and runc state dirs.
        self.namespace = f"kyb-{self.id}"
        # A named network namespace (/run/netns/<name>) to run in, as a node of its own; None: the host's.
        self.netns = netns
        # A mount namespace to run in (/proc/<pid>/ns/mnt of a process in it), as a node's own filesystem view.
        self.mntns = mntns
        self.bridge = f"kyb{self.id}"
        self.subnet = ""
        self.extra_config = extra_config
        self.log_level = log_level
        # Caller's dirs (say, the venv holding our shim), then this version's own runc shim, then the new criu.
        path = [str(Path(p).resolve()) for p in extra_path]
        path += [str(self.binaries.bin_dir), str(stack.criu_dir), os.environ.get("PATH", "")]
        self.env = {**os.environ, "PATH": ":".join(path), **(env or {})}
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Containerd {self.version} {self.dir}>"

    # ---- lifecycle ----

    def start(self, *, timeout: float = 30.0) -> None:
        if self._proc is None:  # first start: lay out the directories and the config
            for d in (self.root, self.state, self.runc_root, self.dir / "cni" / "net.d"):
                d.mkdir(parents=True, exist_ok=True)
            self.subnet = _free_subnet()
            self._write_cni_conf()
            self.config_path.write_text(self._config() + "\n" + self.extra_config + "\n")
        netns_fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY) if self.netns else -1
        mntns_fd = os.open(self.mntns, os.O_RDONLY) if self.mntns else -1
        fds = tuple(fd for fd in (netns_fd, mntns_fd) if fd >= 0)
        try:
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [str(self.binaries.containerd), "--config", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                    # Its own session: a Ctrl-C aimed at pytest must not kill it before teardown runs.
                    start_new_session=True,
                    # Network namespace only (not `ip netns exec`, which also makes a mount namespace):
                    # its CNI bridge and pods then live in that "node", its mounts stay visible here.
                    preexec_fn=(lambda: _join_namespaces(netns_fd, mntns_fd)) if fds else None,
                    pass_fds=fds,
                )
        finally:
            for fd in fds:
                os.close(fd)
        self._wait_ready(timeout)

    def restart(self) -> None:
        """Stop only the daemon (shims and containers keep running) and start it again on the same dirs."""
        self._terminate_daemon()
        self.start()

    def stop(self) -> None:
        """Leave nothing behind: containers, shims, daemon, mounts, cgroups, sockets, bridge, directories.

        Idempotent, and safe after a failed start or a daemon that a test killed.
        """
        if self._stopped:
            return
        self._stopped = True
        fifo_dirs = self._fifo_dirs_held_by_shims()
        # Best effort first: only containerd can tear down pod networks (netns, veth) and delete tasks
        # cleanly. If the daemon died (or a test killed it), bring it back briefly for that.
        try:
            if self._proc is not None and not self.running():
                self.start(timeout=10)
            self._remove_everything_via_api()
        except Exception:  # the forced sweep below still runs
            pass
        self._terminate_daemon()
        self._kill_shims_and_containers()
        self._kill_namespace_cgroups()
        self._unmount_all()
        shutil.rmtree(_DEFAULT_RUNC_ROOT / self.namespace, ignore_errors=True)
        for d in fifo_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if Path("/sys/class/net", self.bridge).exists():
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        _handed_out.discard(self.subnet)
        shutil.rmtree(self.dir, ignore_errors=True)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running() and self._proc else None

    # ---- use ----

    def ctr(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr against this instance (namespace: the instance's own unless given); text in and out.

        Raises CtrError on a non-zero exit when check is true.
        """
        cmd = [str(self.binaries.ctr), "--address", str(self.address), "-n", namespace or self.namespace]
        cmd += _with_fifo_dir(list(args), self.dir / "fifo")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input, env=self.env)
        if check and r.returncode != 0:
            raise CtrError(r.returncode, cmd, r.stdout, r.stderr)
        return r

    def cri(self) -> CriClient:
        """A CRI client on this instance's socket; use it as a context manager."""
        return CriClient(self.address)

    def log_text(self) -> str:
        """Everything the daemon logged so far (all starts of this instance)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ---- config ----

    def _config(self) -> str:
        """Config version 2 for 1.6, version 3 for 2.1; the same settings in both."""
        cni = self.dir / "cni" / "net.d"
        v3 = self.version != "1.6"
        # CRI's runtime section moved from the one CRI plugin (v2) to its own plugin (v3).
        rt = '"io.containerd.cri.v1.runtime"' if v3 else '"io.containerd.grpc.v1.cri"'
        lines = [
            f"version = {3 if v3 else 2}",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            f'  level = "{self.log_level}"',
        ]
        if v3:
            lines += [
                '[plugins."io.containerd.cri.v1.images"]',
                '  snapshotter = "overlayfs"',
                '  [plugins."io.containerd.cri.v1.images".pinned_images]',
                f'    sandbox = "{PAUSE_IMAGE}"',
                '[plugins."io.containerd.grpc.v1.cri"]',
                '  stream_server_port = "0"',
                # NRI's socket path is fixed (/var/run/nri/nri.sock): side-by-side instances would fight.
                '[plugins."io.containerd.nri.v1.nri"]',
                "  disable = true",
                f"[plugins.{rt}]",
            ]
        else:
            lines += [
                f"[plugins.{rt}]",
                f'  sandbox_image = "{PAUSE_IMAGE}"',
                '  stream_server_port = "0"',
            ]
        lines += [
            # This VM drops CAP_SYS_RESOURCE: without it RunPodSandbox fails writing oom_score_adj.
            "  restrict_oom_score_adj = true",
            f"  [plugins.{rt}.cni]",
            # 2.1 takes a list (bin_dir is deprecated there).
            f'    bin_dirs = ["{self.stack.cni_bin_dir}"]' if v3 else f'    bin_dir = "{self.stack.cni_bin_dir}"',
            f'    conf_dir = "{cni}"',
            f"  [plugins.{rt}.containerd]",
            '    default_runtime_name = "runc"',
            *([] if v3 else ['    snapshotter = "overlayfs"']),
            f"    [plugins.{rt}.containerd.runtimes.runc]",
            '      runtime_type = "io.containerd.runc.v2"',
            f"      [plugins.{rt}.containerd.runtimes.runc.options]",
            f'        Root = "{self.runc_root}"',
        ]
        return "\n".join(lines) + "\n"

    def _write_cni_conf(self) -> None:
        conf = {
            "cniVersion": "1.0.0",
            "name": f"kyb-{self.id}",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                # No masquerading: it would add iptables rules to the host.
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": self.subnet}]],
                    # host-local keeps its leases under /var/lib/cni by default, shared by every instance.
                    "dataDir": str(self.dir / "cni" / "ipam"),
                },
            }],
        }
        (self.dir / "cni" / "net.d" / "10-kyb.conflist").write_text(json.dumps(conf, indent=2))

    # ---- internals ----

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                raise RuntimeError(f"containerd {self.version} exited {code} at start:\n{self._tail()}")
            if self.address.exists():
                r = self.ctr("version", check=False, timeout=10)
                if r.returncode == 0:
                    return
                last = r.stderr.strip()
            time.sleep(0.05)
        raise RuntimeError(f"containerd {self.version} not answering on {self.address} ({last}):\n{self._tail()}")

    def _tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _terminate_daemon(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)

    def _remove_everything_via_api(self) -> None:
        """The clean way first, while the daemon is up: it also releases cgroups, netns and runc state."""
        with self.cri() as cri:
            cri.remove_all_pods()
        r = self.ctr("namespaces", "ls", "-q", check=False, timeout=10)
        for ns in r.stdout.split():
            tasks = self.ctr("tasks", "ls", namespace=ns, check=False, timeout=10).stdout.splitlines()[1:]
            for line in tasks:
                task, _, status = (line.split() + ["", "", ""])[:3]
                if status == "PAUSED":
                    self.ctr("tasks", "resume", task, namespace=ns, check=False, timeout=10)
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False, timeout=10)
                self.ctr("tasks", "rm", "-f", task, namespace=ns, check=False, timeout=15)
            for c in self.ctr("containers", "ls", "-q", namespace=ns, check=False, timeout=10).stdout.split():
                self.ctr("containers", "rm", c, namespace=ns, check=False, timeout=15)

    def shim_pids(self) -> dict[int, list[str]]:
        """pid -> argv of every shim process serving this instance (any runtime, any namespace)."""
        procs = _process_table()
        return {pid: procs[pid][1] for pid in self._shims(procs)}

    def _shims(self, procs: dict[int, tuple[int, list[str]]]) -> list[int]:
        # Shims get containerd's address on their command line; other instances' shims have another.
        needle = ("-address", str(self.address))
        return [pid for pid, (_, argv) in procs.items() if _has_pair(argv, needle) and pid != os.getpid()]

    def _fifo_dirs_held_by_shims(self) -> set[Path]:
        """IO fifo dirs that ctr made in the shared default place (ctr restore has no --fifo-dir flag).

        The shims hold the fifos of their tasks open, which makes them ours; ctr itself never removes
        them for a task it did not wait for.
        """
        dirs = set()
        for pid in self._shims(_process_table()):
            for target in procfs.open_files(pid):
                p = Path(target)
                if p.parent.parent == _DEFAULT_FIFO_DIR:
                    dirs.add(p.parent)
        return dirs

    def _kill_shims_and_containers(self) -> None:
        """Kill every shim started for this address, with everything below it (the containers)."""
        procs = _process_table()
        shims = self._shims(procs)
        if not shims:
            return
        sockets = _unix_sockets_of(shims)
        victims = set(shims)
        for shim in shims:
            victims |= _descendants(shim, procs)
        _kill_all(victims)
        for path in sockets:
            if path.startswith("/run/containerd/s/"):  # where shims put theirs, whatever --state says
                Path(path).unlink(missing_ok=True)
            # A kybernate shim killed here never ran its exit cleanup: drop its record too. containerd
            # would have done it through `delete`, but this containerd is gone for good.
            Path(KYBERNATE_SHIM_STATE_DIR, Path(path).name + ".json").unlink(missing_ok=True)

    def _kill_namespace_cgroups(self) -> None:
        """Processes left in this instance's ctr namespace cgroups (say, after a shim was killed)."""
        groups = sorted(Path("/sys/fs/cgroup").glob(f"*/{self.namespace}"))
        pids: set[int] = set()
        for g in groups:
            for procs_file in g.rglob("cgroup.procs"):
                pids |= {int(p) for p in procs_file.read_text().split()}
        _kill_all(pids)
        for g in groups:
            for d in sorted((p for p in g.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [g]:
                try:
                    d.rmdir()
                except OSError:
                    pass

    def _unmount_all(self) -> None:
        prefix = str(self.dir) + "/"
        libc = ctypes.CDLL(None, use_errno=True)
        for target in sorted((m for m in _mount_points() if m.startswith(prefix)), key=len, reverse=True):
            libc.umount2(target.encode(), _MNT_DETACH)


def _with_fifo_dir(args: list[str], fifo_dir: Path) -> list[str]:
    """Point ctr's IO fifos into our dir where the subcommand allows: `ctr run -d` leaves them behind."""
    if args[:1] == ["run"]:
        return [args[0], "--fifo-dir", str(fifo_dir), *args[1:]]
    if len(args) >= 2 and args[0] in ("tasks", "task", "t") and args[1] in ("start", "exec"):
        return [*args[:2], "--fifo-dir", str(fifo_dir), *args[2:]]
    return args


# ---- process and mount helpers (plain /proc reading; no psutil on purpose) ----


def _process_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (ppid, argv) for every process that still exists."""
    return {pid: (p.ppid, list(p.argv)) for pid, p in procfs.processes().items()}


def _has_pair(argv: list[str], pair: tuple[str, str]) -> bool:
    return any(argv[i] == pair[0] and argv[i + 1] == pair[1] for i in range(len(argv) - 1))


def _descendants(root: int, procs: dict[int, tuple[int, list[str]]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _thaw(pid: int) -> None:
    """A frozen process does not die of SIGKILL until thawed (a test may leave a task paused)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        try:
            if controllers == "freezer":
                state = Path("/sys/fs/cgroup/freezer", path.lstrip("/"), "freezer.state")
                if state.read_text().strip() != "THAWED":
                    state.write_text("THAWED")
            elif controllers == "":
                freeze = Path("/sys/fs/cgroup/unified", path.lstrip("/"), "cgroup.freeze")
                if freeze.exists() and freeze.read_text().strip() == "1":
                    freeze.write_text("0")
        except OSError:
            pass


def _kill_all(pids: set[int], timeout: float = 5.0) -> None:
    for pid in pids:
        _thaw(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if procfs.alive(p)}
        time.sleep(0.02)


def _unix_sockets_of(pids: Sequence[int]) -> list[str]:
    """Paths of the unix sockets that these processes hold open (listening ones included)."""
    table, held = procfs.unix_sockets(), procfs.socket_inodes_by_pid()
    return [table[i].lstrip("@") for pid in pids for i in sorted(held.get(pid, ())) if i in table]


def _mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        # mountinfo escapes space, tab, newline and backslash as \ooo octal.
        points.append(raw.encode().decode("unicode_escape"))
    return points


_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_libc = ctypes.CDLL(None, use_errno=True)


def _join_namespaces(netns_fd: int, mntns_fd: int) -> None:
    """In the forked child, before exec: move into the network and/or mount namespace behind the fds (-1: stay)."""
    if netns_fd >= 0 and _libc.setns(netns_fd, _CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns into the node's network namespace failed")
    if mntns_fd >= 0 and _libc.setns(mntns_fd, _CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "setns into the node's mount namespace failed")


# Subnets handed out by this process and not yet given back by stop(). A node in a network namespace of
# its own puts its route there, out of the host's route table: the host's routes alone would let two
# nodes draw one subnet.
_handed_out: set[str] = set()


def _free_subnet() -> str:
    """A /24 in 10.213.0.0/16 that no route on the host uses and no other instance of this process got."""
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    start = secrets.randbelow(256)
    for i in range(256):
        subnet = f"10.213.{(start + i) % 256}.0/24"
        if subnet not in routes and subnet not in _handed_out:
            _handed_out.add(subnet)
            return subnet
    raise RuntimeError("no free /24 left in 10.213.0.0/16")
