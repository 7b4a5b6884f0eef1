"""The node installer image, built by `make image` and run the way packaging/kubernetes/daemonset.yaml runs it.

A node here is a directory tree (its /etc/containerd, /usr/local/bin, /opt/kybernate, /etc/kybernate,
/etc/systemd/system, /run/systemd), mount, network and PID namespaces of its own in which those directories
sit at their real paths (its PID 1 stands for the node's init), and the node's own containerd (B, 1.6.20 or
2.1.9) running in that mount namespace on the node's /etc/containerd/config.toml. The installer image runs
as a privileged container under a second containerd (A, playing the kubelet's runtime) with exactly the
DaemonSet's volumes (mounted from the node tree), environment, hostPID (the PID namespace the node's
containerd, its shims and hookd run in: this machine's, since only their mount and network namespaces are
the node's) and command, minus the three flags that reach the node's systemd (this machine has none, and
its PID 1 is a sandbox's init whose namespaces cannot be entered). What the installer
then prints as "to do: systemctl ..." the test does as systemd would: restart B, start kybernate-hookd with the installed
unit's ExecStart and Environment. The CUDA driver on this node is the named fake.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
import yaml
from conftest import SHIM_BINARY, shim_pids
from harness import images
from harness.containerd import CRI_NAMESPACE, Containerd
from harness.stack import Stack
from harness.workload import COUNTER, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
import fakegpu  # noqa: E402

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "packaging" / "kubernetes" / "daemonset.yaml"
DOCKERFILE = ROOT / "packaging" / "installer" / "Dockerfile"
# The node's own directories: the DaemonSet's hostPaths that this node tree holds. Every other hostPath
# (/usr/bin: the node's python) is this machine's own.
NODE_DIRS = ("/etc/containerd", "/usr/local/bin", "/opt/kybernate", "/etc/kybernate", "/etc/systemd/system",
             "/run/systemd")
# Flags of the DaemonSet's command that make the installer call the node's systemctl (through nsenter into
# PID 1's mount namespace); there is no systemd here, and this machine's PID 1 cannot be entered, so the test
# leaves them out and runs the printed commands itself.
SYSTEMD_FLAGS = ("--start-hookd", "--restart-containerd", "--host-exec nsenter")
UNIT = "/etc/systemd/system/kybernate-hookd.service"
SHIMD_UNIT = "/etc/systemd/system/kybernate-shimd.service"
HOOKD_SOCKET = "/run/kybernate/hookd.sock"


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kyb_image_build", ROOT / "packaging" / "image" / "build.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kyb_image_build"] = mod
    spec.loader.exec_module(mod)
    return mod


build = _build_module()


# ---- the images: built once per session (and reused across sessions while the inputs are unchanged) ----


@pytest.fixture(scope="session")
def installer_images() -> dict[str, Any]:
    """The image `make image` builds, and a second version of it (kybernate 0.1.0+upg) for the upgrade."""
    return {"v1": build.build(ROOT / "build" / "kybernate-node-installer.tar"),
            "v2": build.build(ROOT / "build" / "kybernate-node-installer-upg.tar", label="upg")}


def test_the_image_build_is_reproducible(installer_images: dict[str, Any], tmp_path: Path) -> None:
    """A fresh build into another file gives the same bytes, hence the same digest."""
    first = installer_images["v1"]
    again = build.build(tmp_path / "again.tar")
    assert not again.reused
    assert again.manifest_digest == first.manifest_digest
    assert hashlib.sha256(again.path.read_bytes()).digest() == hashlib.sha256(first.path.read_bytes()).digest()
    assert installer_images["v2"].manifest_digest != first.manifest_digest


def test_the_dockerfile_runs_the_image_builder_with_the_same_pins(installer_images: dict[str, Any]) -> None:
    """No Docker here: the Dockerfile must build its root filesystem with build.py itself, from the same pinned
    lists, and give the image build.py's entrypoint and environment; build.py's --layer (what its build stage
    writes) must be exactly the layer of `make image`."""
    text = DOCKERFILE.read_text()
    build_stage, final = text.split("\nFROM scratch\n")
    # The build stage has everything build.py reads, at the same place relative to its working directory.
    assert re.search(r"(?m)^WORKDIR /src$", build_stage)
    copied: set[str] = set()
    for srcs in re.findall(r"(?m)^COPY (?!--from)(.+) \S+$", build_stage):
        copied |= set(srcs.split())
    for dst_line in re.findall(r"(?m)^COPY (?!--from)(\S+) (\S+)$", build_stage):
        assert dst_line[1] in (dst_line[0], "./"), f"COPY {dst_line[0]} {dst_line[1]}: not to the same path"
    inputs = {*build.WHEEL_SOURCES, *build.PAYLOAD_FILES, "packaging/image"}
    assert inputs <= copied, f"the Dockerfile's build stage lacks {sorted(inputs - copied)}"
    pins = [build.DEBS_LIST, build.CONSTRAINTS, build.BUILD_TOOLS]
    assert all(p.parent == ROOT / "packaging/image" for p in pins)  # ...so the COPY above carries every pin
    run = re.search(r"(?ms)^RUN python3 -m venv /venv(.*?)(?=^\S|\Z)", build_stage)
    assert run, "no build RUN in the Dockerfile's build stage"
    assert "-r packaging/image/build-tools.txt" in run.group(1)  # the pinned setuptools, as `make image`
    assert "packaging/image/build.py --layer /rootfs.tar" in run.group(1)
    assert "tar -xf /rootfs.tar -C /rootfs" in run.group(1)
    # The final stage: only that root filesystem, and build.py's config.
    assert re.findall(r"(?m)^(COPY|RUN|ADD) .*$", final) == ["COPY"]
    assert re.search(r"(?m)^COPY --from=build /rootfs/ /$", final)
    entry = re.search(r"(?m)^ENTRYPOINT (.+)$", final)
    cmd = re.search(r"(?m)^CMD (.+)$", final)
    assert entry and json.loads(entry.group(1)) == build.ENTRYPOINT
    assert cmd and json.loads(cmd.group(1)) == build.CMD
    env = re.search(r"(?m)^ENV (.+)$", final)
    assert env and set(env.group(1).split()) == set(build.ENV)
    # What the build stage writes is byte for byte the layer of `make image` (its diff_id).
    layer = build.build_layer(Path(os.environ.get("KYB_IMAGE_CACHE", "/var/tmp/kyb-image-cache")))
    with tarfile.open(installer_images["v1"].path) as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(outer.extractfile(f"blobs/sha256/{index['manifests'][0]['digest'][7:]}"))  # type: ignore[arg-type]
        config = json.load(outer.extractfile(f"blobs/sha256/{manifest['config']['digest'][7:]}"))  # type: ignore[arg-type]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]


def test_every_wheel_in_the_image_is_pinned(installer_images: dict[str, Any]) -> None:
    """kybernate with its s3 extra for each CPython; every other wheel at the version constraints.txt pins."""
    pins = build.read_pins(build.CONSTRAINTS)
    files = build.list_files(installer_images["v1"].path)
    for v in build.PYTHONS:
        d = "/payload/wheels/cp" + v.replace(".", "") + "/"
        wheels = [Path(f).name for f in files if f.startswith(d) and f.endswith(".whl")]
        names = {w.split("-")[0] for w in wheels}
        assert {"kybernate", "grpcio", "protobuf", "pyroute2", "nvidia_ml_py", "prometheus_client", "boto3",
                "botocore", "s3transfer"} <= names, (d, names)
        for w in wheels:
            name, version = w.split("-")[:2]
            if name != "kybernate":
                assert pins.get(build._normalize(name)) == version, f"{d}{w} is not the version constraints.txt pins"
    # `command -v nsenter`; the DaemonSet's /bin/sh -c and sleep.
    assert {"/usr/bin/nsenter", "/usr/bin/python3", "/usr/bin/sh", "/usr/bin/sleep", "/bin"} <= set(files)


# ---- the DaemonSet, read from its manifest -------------------------------------------------------------


@dataclass(frozen=True)
class PodSpec:
    command: list[str]  # /bin/sh -c <args>, with SYSTEMD_FLAGS taken out
    env: list[str]
    mounts: list[tuple[str, str, bool]]  # hostPath, mountPath, read-only
    host_pid: bool
    privileged: bool


def daemonset_pod() -> PodSpec:
    doc = yaml.safe_load(DAEMONSET.read_text())
    spec = doc["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    script = " ".join(container["args"])
    for flag in SYSTEMD_FLAGS:
        assert f" {flag}" in script, f"daemonset.yaml's command no longer has {flag}: revisit this test"
        script = script.replace(f" {flag}", "")
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    mounts = [(volumes[m["name"]], m["mountPath"], bool(m.get("readOnly"))) for m in container["volumeMounts"]]
    env = [f"{e['name']}={e['value']}" for e in container.get("env", [])]
    return PodSpec(container["command"] + [script], env, mounts, bool(spec.get("hostPID")),
                   bool(container["securityContext"]["privileged"]))


# ---- a node: its directory tree, its namespaces (mount, network, PID), its containerd, its hookd -------------


@dataclass
class Node:
    root: Path
    holder: subprocess.Popen[bytes]
    ctrd: Containerd | None = None
    hookd: subprocess.Popen[bytes] | None = None
    shimd: subprocess.Popen[bytes] | None = None
    gpu: fakegpu.Built | None = None
    gpu_state: Path | None = None
    logs: list[Path] = field(default_factory=list)

    def path(self, host_path: str) -> Path:
        """Where a node path is, seen from this test: in the node tree for the node's dirs, else the machine's."""
        if any(host_path == d or host_path.startswith(d + "/") for d in NODE_DIRS):
            return self.root / host_path.lstrip("/")
        return Path(host_path)

    @property
    def init(self) -> int:
        """The node's PID 1 (unshare --fork's child), whose namespaces are the node's."""
        return int(Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read_text().split()[0])

    @property
    def mntns(self) -> Path:
        return Path(f"/proc/{self.init}/ns/mnt")

    def nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.init}", "--mount", "--net", "--", *argv]

    def start_hookd(self) -> None:
        """What `systemctl start kybernate-hookd` does with the installed unit: its ExecStart, its Environment."""
        unit = self.path(UNIT).read_text()
        exec_start = re.search(r"(?m)^ExecStart=(.+)$", unit)
        assert exec_start, unit
        env = dict(e.split("=", 1) for e in re.findall(r"(?m)^Environment=(\S+)$", unit))
        # The node's CUDA driver (the fake) is on the loader's path, as a real driver's libcuda.so.1 would be.
        assert self.gpu and self.gpu_state
        env |= {"LD_LIBRARY_PATH": str(self.gpu.dir), "FAKEGPU_STATE_DIR": str(self.gpu_state),
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        log = self.root.parent / f"hookd-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            self.hookd = subprocess.Popen(self.nsenter(shlex.split(exec_start.group(1))), env=env, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        sock = Path(f"/proc/{self.init}/root{HOOKD_SOCKET}")
        wait_for("kybernate-hookd to listen", lambda: sock.exists() or self.hookd.poll() is not None, 30)
        assert self.hookd.poll() is None, log.read_text()

    def stop_hookd(self) -> None:
        """`systemctl stop kybernate-hookd`: SIGTERM (the unit's KillSignal), then wait."""
        if self.hookd is not None and self.hookd.poll() is None:
            self.hookd.send_signal(signal.SIGTERM)
            self.hookd.wait(timeout=120)
        self.hookd = None

    def start_shimd(self) -> None:
        """`systemctl start kybernate-shimd` with the installed unit: its ExecStart and Environment, in the node's
        namespaces (its RuntimeDirectory, /run/kybernate-shimd, is the node's own tmpfs)."""
        unit = self.path(SHIMD_UNIT).read_text()
        exec_start = re.search(r"(?m)^ExecStart=(.+)$", unit)
        assert exec_start and re.search(r"(?m)^KillMode=process$", unit), unit
        env = dict(e.split("=", 1) for e in re.findall(r"(?m)^Environment=(\S+)$", unit))
        env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        log = self.root.parent / f"shimd-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as f:
            self.shimd = subprocess.Popen(self.nsenter(shlex.split(exec_start.group(1))), env=env, stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        wait_for("kybernate-shimd to be ready", lambda: "msg=ready" in log.read_text() or self.shimd.poll() is not None,
                 60)
        assert self.shimd.poll() is None, log.read_text()

    def stop_shimd(self) -> None:
        """`systemctl stop kybernate-shimd`: SIGTERM to the resident alone (KillMode=process), then wait."""
        if self.shimd is not None and self.shimd.poll() is None:
            self.shimd.send_signal(signal.SIGTERM)
            self.shimd.wait(timeout=60)
        self.shimd = None

    def hookd_program(self) -> list[str]:
        assert self.hookd is not None
        return Path(f"/proc/{self.hookd.pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


_NODE_SETUP = r"""
set -eu
# /etc and /opt: writable overlays private to this node, so /etc/kybernate and /opt/kybernate can exist here.
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$S/etc.up,workdir=$S/etc.work" /etc
mount -t tmpfs -o mode=755 tmpfs /opt
mkdir -p /etc/containerd /etc/kybernate /etc/systemd/system /opt/kybernate /run/kybernate /run/kybernate-shimd
for d in /etc/containerd /etc/kybernate /etc/systemd/system /opt/kybernate /usr/local/bin; do
    mount --bind "$N$d" "$d"
done
mount -t tmpfs -o mode=755 tmpfs /run/kybernate
mount -t tmpfs -o mode=700 tmpfs /run/kybernate-shimd
ip link set lo up
touch "$S/ready"
exec sleep 2147483647
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "node"
    # multi-user.target.wants: every systemd node has it (an uninstall takes out its link, not the directory).
    for d in NODE_DIRS + ("/usr/bin", "/etc/systemd/system/multi-user.target.wants"):
        (root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
    scratch = tmp_path / "ns"
    for d in ("etc.up", "etc.work"):
        (scratch / d).mkdir(parents=True)
    holder = subprocess.Popen(["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child",
                               "--propagation", "private", "sh", "-c", _NODE_SETUP],
                              env={**os.environ, "N": str(root), "S": str(scratch)}, start_new_session=True)
    n = Node(root, holder)
    try:
        wait_for("the node's namespaces", lambda: (scratch / "ready").exists() or holder.poll() is not None, 30)
        assert holder.poll() is None, "setting up the node's mount namespace failed"
        n.gpu = fakegpu.build(Path("/tmp/kybernate-fakegpu"))
        fake = fakegpu.FakeNode(tmp_path / "fakegpu")
        fake.set_gpus([fakegpu.FakeGpu("GPU-11111111-2222-3333-4444-555555555555", "NVIDIA H100 80GB HBM3", 80 << 30)])
        n.gpu_state = tmp_path / "fakegpu"
        yield n
    finally:
        if n.ctrd is not None:
            n.ctrd.stop()
        n.stop_hookd()
        n.stop_shimd()
        holder.kill()
        holder.wait(timeout=10)


def start_node_containerd(n: Node, stack: Stack, version: str, test_images: dict[str, images.ImageTar]) -> None:
    """The node's containerd, in the node's mount namespace, on the node's /etc/containerd/config.toml."""
    c = Containerd(stack, version, mntns=n.mntns)
    c.config_path = n.path("/etc/containerd/config.toml")  # the harness writes its CRI config there
    n.ctrd = c
    c.start()
    # Shaped like `containerd config default` output, which both versions start with `imports = []` (a config
    # without the key gets `imports = []` back from an uninstall, not the missing line: test_installer.py).
    text = c.config_path.read_text()
    c.config_path.write_text(re.sub(r"(?m)^(version = \d+)$", r"\1\nimports = []", text, count=1))
    c.restart()
    images.import_image(c, test_images["busybox"], namespace=CRI_NAMESPACE)
    images.import_image(c, test_images["pause"], namespace=CRI_NAMESPACE)


# ---- the installer pod, under containerd A ---------------------------------------------------------------


_runs = iter(range(1000))


def run_installer(kubelet: Containerd, n: Node, image: Any, argv: list[str] | None = None) -> str:
    """The DaemonSet's container (or, with argv, the same image, mounts and env with that command).

    With the DaemonSet's command it waits until the installer is done and the pod sleeps, then deletes the
    pod (as a rolling update would); returns what the installer printed.
    """
    pod = daemonset_pod()
    assert pod.privileged and pod.host_pid
    name = f"installer-{next(_runs)}"
    log = n.root.parent / f"{name}.log"
    # hostPID: the PID namespace of the node's processes (its containerd, shims and hookd), so the installer
    # sees which version's files they use.
    assert n.ctrd is not None and n.ctrd._proc is not None
    args = ["run", "--privileged", "--with-ns", f"pid:/proc/{n.ctrd._proc.pid}/ns/pid"]
    for host_path, mount_path, ro in pod.mounts:
        src = n.path(host_path)
        assert src.is_dir(), f"hostPath {host_path} ({src}) is missing on the node"
        args += ["--mount", f"type=bind,src={src},dst={mount_path},options=rbind:{'ro' if ro else 'rw'}"]
    for e in pod.env:
        args += ["--env", e]
    command = argv or pod.command
    if argv is not None:  # a one-off run: wait for it to exit
        r = kubelet.ctr(*args, "--rm", image.name, name, *command, check=False, timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"{' '.join(command)} exited {r.returncode}:\n{out}"
        return out
    kubelet.ctr(*args, "-d", "--log-uri", f"file://{log}", image.name, name, *command, timeout=60)

    def done() -> str | None:
        text = log.read_text() if log.exists() else ""
        status = kubelet.ctr("tasks", "ls", check=False).stdout
        row = next((line.split() for line in status.splitlines() if line.startswith(name + " ")), None)
        if row and row[-1] == "STOPPED":
            raise AssertionError(f"the installer pod exited:\n{text}")
        # install.py's last line, then the pod sleeps (sleep's process replaced the shell).
        if re.search(r"(?m)^(installed|nothing to change: .*)$", text):
            return text
        return None

    out = wait_for("the installer to finish and the pod to sleep", done, 180)
    kubelet.ctr("tasks", "kill", "-s", "SIGKILL", name, check=False)
    wait_for("the installer pod to stop", lambda: "RUNNING" not in kubelet.ctr("tasks", "ls").stdout)
    kubelet.ctr("tasks", "rm", "-f", name, check=False)
    kubelet.ctr("containers", "rm", name)
    return out


def todo(out: str) -> list[str]:
    """The commands the installer left for the operator (`to do: <command>  (why)`)."""
    return [m.group(1) for m in re.finditer(r"(?m)^to do: (.+?)  \(", out)]


def as_systemd_would(n: Node, commands: list[str]) -> None:
    """Carry out the installer's "to do" systemctl commands on this systemd-less node."""
    assert n.ctrd is not None
    for cmd in commands:
        if cmd == "systemctl daemon-reload":
            continue  # the unit file is read afresh by start_hookd anyway
        elif cmd == "systemctl restart kybernate-hookd":
            n.stop_hookd()
            n.start_hookd()
        elif cmd == "systemctl stop kybernate-hookd":
            n.stop_hookd()
        elif cmd == "systemctl restart kybernate-shimd":
            n.stop_shimd()
            n.start_shimd()
        elif cmd == "systemctl stop kybernate-shimd":
            n.stop_shimd()
        elif cmd == "systemctl restart containerd":
            n.ctrd.restart()
            wait_for("CRI to serve again after the restart", lambda: _cri_ready(n.ctrd), 30)
        else:
            raise AssertionError(f"the installer asks for {cmd!r}, which this test does not know how to do")


def _cri_ready(c: Containerd) -> bool:
    with c.cri() as cri:
        try:
            cri.list_pods()
            return True
        except grpc.RpcError:  # "server is not initialized yet" while CRI reloads its state
            return False


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = "/" + str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", p.stat().st_mode)
            else:
                out[rel] = ("file", p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# ---- a kybernate pod on the node -------------------------------------------------------------------------


@dataclass
class CounterPod:
    pod: str
    container: str


def start_counter(c: Containerd, name: str) -> CounterPod:
    with c.cri() as cri:
        config = cri.pod_config(name)
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "counter", images.BUSYBOX_IMAGE, command=["sh", "-c", COUNTER])
        cri.start_container(cid)
        wait_for(f"{name} to count", lambda: len(counts(c, cid)) > 2)
    return CounterPod(pod, cid)


def counts(c: Containerd, cid: str) -> list[int]:
    with c.cri() as cri:
        r = cri.exec_sync(cid, ["cat", "/count"])
    return [int(x) for x in r.stdout.split()] if r.exit_code == 0 else []


def checkpoint(c: Containerd, p: CounterPod, ref: str) -> None:
    """A leave-running checkpoint through containerd (1.6 has no CRI checkpoint: ctr for both versions)."""
    c.ctr("containers", "checkpoint", "--task", "--rw", p.container, ref, namespace=CRI_NAMESPACE, timeout=120)
    assert ref in c.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE).stdout


def remove_pod(c: Containerd, p: CounterPod) -> None:
    with c.cri() as cri:
        cri.stop_container(p.container, grace_s=0)
        cri.remove_container(p.container)
        cri.stop_pod(p.pod)
        cri.remove_pod(p.pod)


def version_files(n: Node, pid: int) -> set[str]:
    """The files under /opt/kybernate a process runs (its command line) or maps, as the node names them."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    # Read in the node's mount namespace, where the paths of its mounts are the node's.
    maps = subprocess.run(n.nsenter(["cat", f"/proc/{pid}/maps"]), capture_output=True, text=True, timeout=30,
                          check=True).stdout
    mapped = [line.split(None, 5)[5] for line in maps.splitlines() if len(line.split(None, 5)) == 6]
    return {f for f in [*argv, *mapped] if f.startswith("/opt/kybernate/")}


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def version_of(path: str) -> str:
    m = re.match(r"/opt/kybernate/versions/[^/]+", path)
    assert m, f"{path} is not in a version directory"
    return m.group(0)


# ---- the cycle ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.6", "2.1"], ids=["ctrd1.6", "ctrd2.1"])
def test_daemonset_install_pod_upgrade_uninstall(
    version: str, node: Node, stack: Stack, test_images: dict[str, images.ImageTar],
    installer_images: dict[str, Any], containerd_factory: Any,
) -> None:
    v1, v2 = installer_images["v1"], installer_images["v2"]
    kubelet = containerd_factory(version, with_images=False)
    for img in (v1, v2):
        images.import_image(kubelet, images.ImageTar(img.name, img.path, img.manifest_digest))
    start_node_containerd(node, stack, version, test_images)
    assert node.ctrd is not None
    b = node.ctrd
    config = node.path("/etc/containerd/config.toml")
    original = config.read_bytes()
    before = snapshot(node.root)

    # ---- install: the DaemonSet's pod does its work, then sleeps --------------------------------------------
    out = run_installer(kubelet, node, v1)
    assert "installed" in out.splitlines()
    assert todo(out) == ["systemctl daemon-reload", "systemctl restart kybernate-hookd", "systemctl restart kybernate-shimd",
                         "systemctl restart containerd"]
    record = json.loads(node.path("/opt/kybernate/installed.json").read_text())
    assert record["python"] == os.path.realpath("/usr/bin/python3")  # the node's python, found through /host/usr/bin
    assert "kybernate-0.1.0-py3-none-any.whl" in record["wheels"] and record["extras"] == ["s3"]
    dir1 = record["venv"]
    assert dir1.startswith("/opt/kybernate/versions/0.1.0-")
    assert node.path(UNIT).read_text().endswith((ROOT / "packaging/systemd/kybernate-hookd.service").read_text())
    assert os.readlink(node.path("/etc/systemd/system/multi-user.target.wants/kybernate-hookd.service")) == UNIT
    # ...and as the installer asks: the unit's daemon, then containerd on its new config.
    as_systemd_would(node, todo(out))
    exec_start = re.search(r"(?m)^ExecStart=(.+)$", node.path(UNIT).read_text())
    assert exec_start and shlex.split(exec_start.group(1))[0] == "/usr/local/bin/kybernate-hookd"
    # The launcher's shebang runs it on the version's venv python (the node's python3.11).
    assert node.hookd_program() == [f"{dir1}/bin/python3", *shlex.split(exec_start.group(1))]
    # The S3 tier's client is in that venv: hookd's store can use it.
    s3 = subprocess.run(node.nsenter([f"{dir1}/bin/python3", "-c", "import boto3, kybernate.hooks.api.store_s3"]),
                        capture_output=True, text=True, timeout=60)
    assert s3.returncode == 0, s3.stderr
    # kybernate-shimd, started from its installed unit, runs on the same version's python (it re-executes
    # itself once with room for its workers' command lines). No C compiler in the image: the shim binary is
    # the Python launcher, which hands every command to it.
    assert node.path(SHIMD_UNIT).read_text().endswith((ROOT / "packaging/systemd/kybernate-shimd.service").read_text())
    assert os.readlink(node.path("/etc/systemd/system/multi-user.target.wants/kybernate-shimd.service")) == SHIMD_UNIT
    assert node.shimd is not None
    shimd_argv = Path(f"/proc/{node.shimd.pid}/cmdline").read_bytes().split(b"\0")
    assert shimd_argv[0].decode() == f"{dir1}/bin/python3" and b"kybernate.shim.resident" in shimd_argv
    assert "no C compiler the installer can run on the node" in out

    # ---- a pod of runtime class kybernate ----------------------------------------------------------------------
    first = start_counter(b, "first")
    (old_shim,) = shim_pids(b, SHIM_BINARY)  # one kybernate shim daemon per pod
    assert parent_of(old_shim) == node.shimd.pid  # the pod's start went through kybernate-shimd
    checkpoint(b, first, "kyb.local/ckpt/first:1")

    # ---- upgrade: a second image version, while the pod runs ---------------------------------------------------
    installed_config = config.read_bytes()
    out = run_installer(kubelet, node, v2)
    record = json.loads(node.path("/opt/kybernate/installed.json").read_text())
    dir2 = record["venv"]
    assert dir2.startswith("/opt/kybernate/versions/0.1.0+upg-")
    assert f"create {dir2} for" in out
    # The first version stays: the old pod's shim (and the old hookd, until restarted) run from it.
    assert re.search(rf"(?m)^note: kept {re.escape(dir1)}: still in use by pid\(s\) .*\b{old_shim}\b", out), out
    assert config.read_bytes() == installed_config  # containerd's config is the same...
    # ...but the installer cannot know that the restart it asked for happened (systemd would have told it).
    assert "to do: systemctl restart containerd  (load the config an earlier run changed" in out
    assert todo(out) == ["systemctl daemon-reload", "systemctl restart kybernate-hookd", "systemctl restart kybernate-shimd",
                         "systemctl restart containerd"]
    assert "kybernate-0.1.0+upg-py3-none-any.whl" in record["wheels"]
    as_systemd_would(node, todo(out))  # new hookd; containerd restarted under the running pod
    assert node.hookd_program()[0] == f"{dir2}/bin/python3"
    # kybernate-shimd was restarted on the new version; the pod it started before does not depend on it.
    assert Path(f"/proc/{node.shimd.pid}/cmdline").read_bytes().split(b"\0")[0].decode() == f"{dir2}/bin/python3"
    # The pod never stopped; the shim that started it still serves it: it pauses, resumes and checkpoints.
    seen = counts(b, first.container)[-1]
    wait_for("the first pod to go on counting", lambda: counts(b, first.container)[-1] > seen + 1)
    assert shim_pids(b, SHIM_BINARY) == [old_shim]
    b.ctr("tasks", "pause", first.container, namespace=CRI_NAMESPACE, timeout=60)
    assert "PAUSED" in b.ctr("tasks", "ls", namespace=CRI_NAMESPACE).stdout
    b.ctr("tasks", "resume", first.container, namespace=CRI_NAMESPACE, timeout=60)
    checkpoint(b, first, "kyb.local/ckpt/first:2")
    wait_for("the first pod to count after the checkpoint", lambda: counts(b, first.container)[-1] > seen + 3)
    # ...and after all that, every file of ours it runs or maps is the first version's: none of the second's.
    old_files = version_files(node, old_shim)
    assert any(f.endswith(".so") for f in old_files), old_files  # native modules it maps, not only its argv
    assert {version_of(f) for f in old_files} == {dir1}
    # A new pod runs on the new version.
    second = start_counter(b, "second")
    (new_shim,) = set(shim_pids(b, SHIM_BINARY)) - {old_shim}
    assert parent_of(new_shim) == node.shimd.pid  # started through the new kybernate-shimd
    assert {version_of(f) for f in version_files(node, new_shim)} == {dir2}
    venv_version = subprocess.run(node.nsenter(["/opt/kybernate/current/bin/python3", "-c",
                                                "import importlib.metadata as m; print(m.version('kybernate'))"]),
                                  capture_output=True, text=True, timeout=30)
    assert venv_version.stdout.strip() == "0.1.0+upg", venv_version.stderr

    # ---- uninstall through the same image, after draining the node ---------------------------------------------
    for p in (first, second):
        remove_pod(b, p)
    wait_for("the kybernate shims to exit", lambda: not shim_pids(b, SHIM_BINARY))
    # The DaemonSet's pod, restarted: nothing to install, and the first version, now unused, goes.
    out = run_installer(kubelet, node, v2)
    assert f"remove {dir1} (an earlier version no process uses)" in out.splitlines()
    assert not node.path(dir1).exists() and node.path(dir2).is_dir()
    out = run_installer(kubelet, node, v2, ["python3", "/payload/packaging/installer/install.py",
                                            "--host-root", "/host", "--uninstall"])
    assert "uninstalled" in out.splitlines()
    assert todo(out) == ["systemctl stop kybernate-hookd", "systemctl stop kybernate-shimd", "systemctl daemon-reload",
                         "systemctl restart containerd"]
    as_systemd_would(node, todo(out))
    assert node.hookd is None and node.shimd is None
    assert config.read_bytes() == original
    # The node tree is the one before the install: every path, mode and byte (no backups, no runtime.toml the
    # install wrote, no conf.d it made).
    assert snapshot(node.root) == before
    with b.cri() as cri:  # the node's containerd runs on the restored config, without the runtime
        with pytest.raises(Exception, match="kybernate"):
            cri.run_pod(cri.pod_config("gone"), runtime_handler="kybernate")
