"""The node installer image, built by `make image` and run the way packaging/kubernetes/daemonset.yaml runs it.

A node here is a directory tree (its /etc/containerd, /usr/local/bin, /opt/kybernate, /etc/kybernate,
/etc/systemd/system, /run/systemd), mount, network and PID namespaces of its own in which those directories
sit at their real paths (its PID 1 stands for the node's init), and the node's own containerd (B, 1.6.20 or
2.1.9) running in that mount namespace on the node's /etc/containerd/config.toml. The installer image runs
as a privileged container under a second containerd (A, playing the kubelet's runtime) with exactly the
DaemonSet's volumes (mounted from the node tree), environment, hostPID (the node's PID namespace) and
command, minus the two flags that need systemd (this machine has none). What the installer then prints as
"to do: systemctl ..." the test does as systemd would: restart B, start kybernate-hookd with the installed
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
# Flags of the DaemonSet's command that make the installer call the node's systemctl; there is no systemd
# here, so the test leaves them out and runs the printed commands itself.
SYSTEMD_FLAGS = ("--start-hookd", "--restart-containerd")
UNIT = "/etc/systemd/system/kybernate-hookd.service"
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


def test_the_image_holds_what_the_dockerfile_puts_in_it(installer_images: dict[str, Any]) -> None:
    """No Docker here: compare the file list and entrypoint the Dockerfile implies with the built image's."""
    text = DOCKERFILE.read_text()
    files = set(build.list_files(installer_images["v1"].path))
    # Every COPY into /payload of the final stage, file or directory.
    final = text.rsplit("\nFROM ", 1)[1]
    copies = re.findall(r"(?m)^COPY (?!--from)(\S+) (\S+)$", final)
    assert copies, "no COPY lines found in the Dockerfile's final stage"
    for src, dst in copies:
        if (ROOT / src).is_dir():
            expected = {dst + "/" + str(f.relative_to(ROOT / src)) for f in (ROOT / src).rglob("*") if f.is_file()}
        else:
            expected = {dst}
        assert expected <= files, f"the Dockerfile copies {src} to {dst}; the image lacks {sorted(expected - files)}"
    # The wheels stage: one directory per CPython of ARG PYTHONS, each with kybernate and grpcio.
    pythons = re.search(r'ARG PYTHONS="([^"]+)"', text)
    assert pythons and tuple(pythons.group(1).split()) == build.PYTHONS
    for v in build.PYTHONS:
        d = "/payload/wheels/cp" + v.replace(".", "")
        names = {Path(f).name.split("-")[0] for f in files if f.startswith(d + "/")}
        assert {"kybernate", "grpcio", "protobuf", "pyroute2", "nvidia_ml_py"} <= names, (d, names)
    entry = re.search(r"(?m)^ENTRYPOINT (.+)$", text)
    cmd = re.search(r"(?m)^CMD (.+)$", text)
    assert entry and json.loads(entry.group(1)) == build.ENTRYPOINT
    assert cmd and json.loads(cmd.group(1)) == build.CMD
    # Its final stage's Debian packages are among those the image is unpacked from; its ENV is the image's.
    installed = re.search(r"apt-get install -y --no-install-recommends ([^\\&]+)", final)
    assert installed, "no apt-get install line in the Dockerfile's final stage"
    assert set(installed.group(1).split()) <= {name for name, _ in build.read_debs()}
    env = re.search(r"(?m)^ENV (.+)$", final)
    assert env and set(env.group(1).split()) == {e for e in build.ENV if not e.startswith("PATH=")}
    # `command -v nsenter` in the Dockerfile; the DaemonSet's /bin/sh -c and sleep.
    assert {"/usr/bin/nsenter", "/usr/bin/python3", "/usr/bin/sh", "/usr/bin/sleep", "/bin"} <= files


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

    def hookd_program(self) -> list[str]:
        assert self.hookd is not None
        return Path(f"/proc/{self.hookd.pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


_NODE_SETUP = r"""
set -eu
# /etc and /opt: writable overlays private to this node, so /etc/kybernate and /opt/kybernate can exist here.
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$S/etc.up,workdir=$S/etc.work" /etc
mount -t tmpfs -o mode=755 tmpfs /opt
mkdir -p /etc/containerd /etc/kybernate /etc/systemd/system /opt/kybernate /run/kybernate
for d in /etc/containerd /etc/kybernate /etc/systemd/system /opt/kybernate /usr/local/bin; do
    mount --bind "$N$d" "$d"
done
mount -t tmpfs -o mode=755 tmpfs /run/kybernate
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
    args = ["run", "--privileged", "--with-ns", f"pid:/proc/{n.init}/ns/pid"]  # hostPID: the node's PIDs
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
        elif cmd in ("systemctl restart kybernate-shimd", "systemctl stop kybernate-shimd"):
            # This node runs no kybernate-shimd: its shims take the Python path (one warning in containerd's
            # log), which is all the pods here need. The resident itself: tests/integration/test_shim_resident.py.
            continue
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
    assert todo(out) == ["systemctl daemon-reload", "systemctl restart kybernate-hookd",
                         "systemctl restart kybernate-shimd", "systemctl restart containerd"]
    record = json.loads(node.path("/opt/kybernate/installed.json").read_text())
    assert record["python"] == os.path.realpath("/usr/bin/python3")  # the node's python, found through /host/usr/bin
    assert "kybernate-0.1.0-py3-none-any.whl" in record["wheels"]
    assert node.path(UNIT).read_text().endswith((ROOT / "packaging/systemd/kybernate-hookd.service").read_text())
    assert os.readlink(node.path("/etc/systemd/system/multi-user.target.wants/kybernate-hookd.service")) == UNIT
    # ...and as the installer asks: the unit's daemon, then containerd on its new config.
    as_systemd_would(node, todo(out))
    exec_start = re.search(r"(?m)^ExecStart=(.+)$", node.path(UNIT).read_text())
    assert exec_start and shlex.split(exec_start.group(1))[0] == "/usr/local/bin/kybernate-hookd"
    # The launcher's shebang runs it on the venv's python (the node's python3.11).
    assert node.hookd_program() == ["/opt/kybernate/venv/bin/python3", *shlex.split(exec_start.group(1))]

    # ---- a pod of runtime class kybernate ----------------------------------------------------------------------
    first = start_counter(b, "first")
    (old_shim,) = shim_pids(b, SHIM_BINARY)  # one kybernate shim daemon per pod
    checkpoint(b, first, "kyb.local/ckpt/first:1")

    # ---- upgrade: a second image version, while the pod runs ---------------------------------------------------
    installed_config = config.read_bytes()
    out = run_installer(kubelet, node, v2)
    assert "rebuild /opt/kybernate/venv" in out
    assert config.read_bytes() == installed_config  # containerd's config is the same...
    # ...but the installer cannot know that the restart it asked for happened (systemd would have told it).
    assert "to do: systemctl restart containerd  (load the config an earlier run changed" in out
    assert todo(out) == ["systemctl daemon-reload", "systemctl restart kybernate-hookd",
                         "systemctl restart kybernate-shimd", "systemctl restart containerd"]
    record = json.loads(node.path("/opt/kybernate/installed.json").read_text())
    assert "kybernate-0.1.0+upg-py3-none-any.whl" in record["wheels"]
    as_systemd_would(node, todo(out))  # new hookd; containerd restarted under the running pod
    # The pod never stopped; the shim that started it still serves it, and it checkpoints.
    seen = counts(b, first.container)[-1]
    wait_for("the first pod to go on counting", lambda: counts(b, first.container)[-1] > seen + 1)
    assert shim_pids(b, SHIM_BINARY) == [old_shim]
    checkpoint(b, first, "kyb.local/ckpt/first:2")
    wait_for("the first pod to count after the checkpoint", lambda: counts(b, first.container)[-1] > seen + 3)
    # A new pod runs on the new version.
    second = start_counter(b, "second")
    assert len(shim_pids(b, SHIM_BINARY)) == 2 and old_shim in shim_pids(b, SHIM_BINARY)
    venv_version = subprocess.run(node.nsenter(["/opt/kybernate/venv/bin/python3", "-c",
                                                "import importlib.metadata as m; print(m.version('kybernate'))"]),
                                  capture_output=True, text=True, timeout=30)
    assert venv_version.stdout.strip() == "0.1.0+upg", venv_version.stderr

    # ---- uninstall through the same image, after draining the node ---------------------------------------------
    for p in (first, second):
        remove_pod(b, p)
    wait_for("the kybernate shims to exit", lambda: not shim_pids(b, SHIM_BINARY))
    out = run_installer(kubelet, node, v2, ["python3", "/payload/packaging/installer/install.py",
                                            "--host-root", "/host", "--uninstall"])
    assert "uninstalled" in out.splitlines()
    assert todo(out) == ["systemctl stop kybernate-hookd", "systemctl stop kybernate-shimd", "systemctl daemon-reload",
                         "systemctl restart containerd"]
    as_systemd_would(node, todo(out))
    assert node.hookd is None
    assert config.read_bytes() == original
    after = snapshot(node.root)
    # Exactly what the installer documents keeping: the operator's runtime.toml and its config backups; and on
    # version 3 the (empty) conf.d directory it made for the drop-in (it cannot tell whether it made it).
    kept = {k for k in after if k not in before}
    backups = {k for k in kept if re.fullmatch(r"/etc/containerd/config\.toml\.kybernate-backup-\S+", k)}
    conf_d = {"/etc/containerd/conf.d"} if version == "2.1" else set()
    assert kept - backups == {"/etc/kybernate/runtime.toml"} | conf_d
    assert all(not any(node.path(d).iterdir()) for d in conf_d)
    assert len(backups) == 2  # one before the install's edit, one before the uninstall's
    assert {k: v for k, v in after.items() if k in before} == before
    with b.cri() as cri:  # the node's containerd runs on the restored config, without the runtime
        with pytest.raises(Exception, match="kybernate"):
            cri.run_pod(cri.pod_config("gone"), runtime_handler="kybernate")
