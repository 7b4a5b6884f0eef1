"""packaging/installer/install.py, run for real against a temporary node root (--host-root).

The node's containerd config is what the stack's own containerd 1.6.20 / 2.1.9 print for `containerd config
default`; the payload is a real kybernate wheel built from this checkout plus its dependencies as wheels.
The strongest checks hand the installed config to the real containerd of that version: `config dump` must
show the kybernate runtime next to everything the operator had, and a daemon started on it must report
the runtime through CRI. Nothing here touches the machine's own /etc, /usr or /opt, and systemctl is never
run (a temporary root has no way to reach a systemd, and the installer refuses to pretend).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import struct
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from harness.containerd import RUN_BASE
from harness.stack import Stack

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[2]
INSTALLER = ROOT / "packaging" / "installer" / "install.py"
RUNTIME_TYPE = "io.containerd.kybernate.v1"
# containerd 2.x: runc's type with our shim as runtime_path (CRI introspects runc's features only for it).
RUNTIME_TYPES = {"1.6": RUNTIME_TYPE, "2.1": "io.containerd.runc.v2"}
RUNTIME_PATH = "/usr/local/bin/containerd-shim-kybernate-v1"
OPTIONS = {"1.6": {"ConfigPath": "/etc/kybernate/runtime.toml"}, "2.1": {"SystemdCgroup": False}}
CRI = {"1.6": "io.containerd.grpc.v1.cri", "2.1": "io.containerd.cri.v1.runtime"}
CONFIG_VERSION = {"1.6": 2, "2.1": 3}
DROPIN = "/etc/containerd/conf.d/kybernate.toml"
LAUNCHERS = ("containerd-shim-kybernate-v1", "kybernate-hookd", "kybernate-shimd", "containerd-shim-kybernate-v1.py")
SHIMD_UNIT = "/etc/systemd/system/kybernate-shimd.service"
SHIMD_WANTS = "/etc/systemd/system/multi-user.target.wants/kybernate-shimd.service"
DEPENDENCIES = ("grpcio", "protobuf", "pyroute2", "nvidia-ml-py", "prometheus_client", "typing_extensions", "tqdm")
# The `s3` extra (install.py installs it unless told --extras ''): boto3 and its dependencies.
S3_DEPENDENCIES = ("boto3", "botocore", "s3transfer", "jmespath", "python-dateutil", "six", "urllib3")
# The interpreter running the tests plays the node's python3: the dependency wheels were made for it.
HOST_PYTHON = os.path.realpath(sys.executable)
# An operator's own CRI setting that must survive the install (it is in the CRI runtime plugin's section).
OPERATOR_SETTING = ("max_container_log_line_size = 16384", "max_container_log_line_size = 12345")


def _installer_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kyb_install", INSTALLER)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kyb_install"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


install_py = _installer_module()


# ---- session fixtures: default configs and the payload ----------------------------------------------


@pytest.fixture(scope="session")
def default_configs(stack: Stack) -> dict[str, str]:
    """`containerd config default` of each containerd in the stack, with one operator setting changed."""
    out = {}
    for v in ("1.6", "2.1"):
        r = subprocess.run([str(stack.containerd[v].containerd), "config", "default"],
                           capture_output=True, text=True, timeout=30, check=True)
        old, new = OPERATOR_SETTING
        assert r.stdout.count(old) == 1, f"containerd {v}'s default config changed shape: {old!r} not in it"
        out[v] = r.stdout.replace(old, new)
    return out


def _repack_installed(dist_name: str, dest: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists (the venv holds no wheel files).

    The tests' own venv has every dependency for this interpreter; this turns them back into wheels so the
    payload needs no network. Names, tags and contents are those pip installed.
    """
    dist = importlib.metadata.distribution(dist_name)
    wheel_meta = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip().split("-") for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    # Several Tag lines (py2-none-any, py3-none-any) make one compressed tag set (py2.py3-none-any).
    tag = "-".join(".".join(dict.fromkeys(t[i] for t in tags)) for i in range(3))
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = dest / f"{name}-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for f in dist.files or []:
            if ".." in f.parts or "__pycache__" in f.parts:
                continue
            z.write(str(dist.locate_file(f)), str(f))
    return path


@pytest.fixture(scope="session")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kybernate's wheel built from this checkout, plus its dependencies for this interpreter."""
    d = tmp_path_factory.mktemp("payload")
    wheels = d / "wheels"
    wheels.mkdir()
    src = d / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("shim", "hooks", "proto"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"building the kybernate wheel failed:\n{r.stdout}\n{r.stderr}"
    for dep in DEPENDENCIES:
        _repack_installed(dep, wheels)
    return wheels


@pytest.fixture(scope="session")
def payload_s3(payload: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The payload plus the wheels of the s3 extra (botocore alone unpacks to about 100 MB: only where needed)."""
    d = tmp_path_factory.mktemp("payload-s3")
    for w in payload.iterdir():
        os.link(w, d / w.name)
    for dep in S3_DEPENDENCIES:
        _repack_installed(dep, d)
    return d


@pytest.fixture(scope="session")
def payload_v2(payload: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The payload with kybernate as 0.1.0+two: a second version to upgrade to."""
    d = tmp_path_factory.mktemp("payload-v2")
    src = d / "src"
    shutil.copytree(payload.parent / "src", src)
    pyproject = src / "pyproject.toml"
    pyproject.write_text(re.sub(r'(?m)^version = "([^"]+)"$', r'version = "\1+two"', pyproject.read_text(), count=1))
    wheels = d / "wheels"
    wheels.mkdir()
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"building the second kybernate wheel failed:\n{r.stdout}\n{r.stderr}"
    for w in payload.iterdir():
        if not w.name.startswith("kybernate-"):
            os.link(w, wheels / w.name)
    return wheels


# ---- a temporary node ----------------------------------------------------------------------------------


@dataclass
class Node:
    root: Path
    version: str  # the containerd whose default config the node has
    payload: Path
    original: str  # config.toml as the operator left it

    @property
    def config(self) -> Path:
        return self.root / "etc/containerd/config.toml"

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def install(self, *args: str, python: str | None = HOST_PYTHON, wheels: Path | None = None,
                check: bool = True, extras: str | None = "") -> subprocess.CompletedProcess[str]:
        """install.py on this node; extras "" (no s3 extra: its wheels are large) unless given, None: its default."""
        argv = [sys.executable, str(INSTALLER), "--host-root", str(self.root)]
        if "--uninstall" not in args:
            argv += ["--wheels", str(wheels or self.payload)]
            if python:
                argv += ["--python", python]
            if extras is not None:
                argv += ["--extras", extras]
        r = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, f"install.py {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r


def _make_node(root: Path, version: str, config: str | None, payload: Path) -> Node:
    (root / "etc/containerd").mkdir(parents=True)
    if config is not None:
        (root / "etc/containerd/config.toml").write_text(config)
    # The node's python: a link at the same path as the interpreter running the tests, so the venv's
    # bin/python3 (a host path) works here too.
    py = root / HOST_PYTHON.lstrip("/")
    py.parent.mkdir(parents=True)
    py.symlink_to(HOST_PYTHON)
    for d in ("usr/local/bin", "usr/bin", "opt", "etc/systemd/system", "run"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return Node(root, version, payload, config or "")


@pytest.fixture
def make_node(tmp_path: Path, default_configs: dict[str, str], payload: Path) -> Callable[..., Node]:
    """make_node(version, config=<its default>) -> a node root holding containerd's config and a python."""
    count = iter(range(100))

    def make(version: str, config: str | None = "default") -> Node:
        text = default_configs[version] if config == "default" else config
        return _make_node(tmp_path / f"node{next(count)}", version, text, payload)

    return make


@pytest.fixture(params=["1.6", "2.1"], ids=["ctrd1.6", "ctrd2.1"])
def node(request: pytest.FixtureRequest, make_node: Callable[..., Node]) -> Node:
    return make_node(request.param)


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under root with its type, mode, content hash or link target, and mtime."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                out[rel] = ("file", st.st_mode, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def backups(node: Node) -> list[Path]:
    return sorted(node.config.parent.glob("config.toml.kybernate-backup-*"))


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d[k]
    return d


# ---- install, again, dry run, uninstall ----------------------------------------------------------------


def installed_venv(node: Node) -> str:
    """The version directory the launchers use (installed.json's venv), checked to be one under versions/."""
    venv = str(json.loads(node.path("/opt/kybernate/installed.json").read_text())["venv"])
    assert re.fullmatch(r"/opt/kybernate/versions/0\.1\.0-[0-9a-f]{12}", venv), venv
    return venv


def test_install_registers_the_runtime_and_a_second_run_changes_nothing(node: Node) -> None:
    r = node.install()
    venv = installed_venv(node)
    cri = CRI[node.version]
    config = tomllib.loads(node.config.read_text())
    before = tomllib.loads(node.original)
    assert [b.read_text() for b in backups(node)] == [node.original]
    if node.version == "2.1":
        # containerd 2.x merges drop-ins key by key: the entry goes into conf.d, config.toml only imports it.
        dropin = node.path(DROPIN).read_text()
        assert "install.py" in dropin.splitlines()[0]
        entry = _dig(tomllib.loads(dropin), "plugins", cri, "containerd", "runtimes", "kybernate")
        assert tomllib.loads(dropin)["version"] == 3
        assert config["imports"] == [DROPIN]
        assert dict(config, imports=[]) == before  # nothing else in the operator's file moved
        assert f"add {DROPIN} to imports" in r.stdout
    else:
        # containerd 1.x would let a drop-in replace the whole CRI section: a marked block in config.toml.
        assert not node.path(DROPIN).exists()
        entry = _dig(config, "plugins", cri, "containerd", "runtimes", "kybernate")
        assert node.config.read_text().startswith(node.original.rstrip("\n") + "\n\n# >>> kybernate runtime")
        del config["plugins"][cri]["containerd"]["runtimes"]["kybernate"]
        assert config == before
    assert entry["runtime_type"] == RUNTIME_TYPES[node.version]
    assert entry.get("runtime_path") == (RUNTIME_PATH if node.version == "2.1" else None)
    assert entry["pod_annotations"] == entry["container_annotations"] == ["kybernate.io/*"]
    assert entry["options"] == OPTIONS[node.version]

    for name in LAUNCHERS:
        launcher = node.path(f"/usr/local/bin/{name}")
        assert launcher.read_text().startswith(f"#!{venv}/bin/python3\n")
        assert launcher.stat().st_mode & 0o777 == 0o755
    assert os.readlink(node.path(f"{venv}/bin/python3")) == HOST_PYTHON
    assert os.readlink(node.path("/opt/kybernate/current")) == venv.removeprefix("/opt/kybernate/")
    assert node.path("/etc/kybernate/runtime.toml").read_text() == (ROOT / "containerd-config/runtime.toml").read_text()
    unit = node.path("/etc/systemd/system/kybernate-hookd.service").read_text()
    assert unit.endswith((ROOT / "packaging/systemd/kybernate-hookd.service").read_text())
    wants = node.path("/etc/systemd/system/multi-user.target.wants/kybernate-hookd.service")
    assert os.readlink(wants) == "/etc/systemd/system/kybernate-hookd.service"
    # The resident shim starter: its unit (KillMode=process, so pods' shim daemons outlive it), enabled. This run
    # cannot run the node's cc (no --host-exec): the shim binary is the Python launcher, and it says so.
    shimd_unit = node.path(SHIMD_UNIT).read_text()
    assert shimd_unit.endswith((ROOT / "packaging/systemd/kybernate-shimd.service").read_text())
    assert "\nKillMode=process\n" in shimd_unit and "ExecStart=/usr/local/bin/kybernate-shimd " in shimd_unit
    assert os.readlink(node.path(SHIMD_WANTS)) == SHIMD_UNIT
    assert "no C compiler the installer can run on the node" in r.stdout
    assert node.path("/usr/local/bin/containerd-shim-kybernate-v1").read_text() == \
        node.path("/usr/local/bin/containerd-shim-kybernate-v1.py").read_text()
    # Nothing was restarted: the commands are printed, and the pending restart is remembered.
    assert "to do: systemctl restart containerd" in r.stdout
    assert node.path("/opt/kybernate/containerd-restart-pending").exists()

    state = snapshot(node.root)
    again = node.install()
    assert "nothing to change: Kybernate is installed and registered with containerd" in again.stdout
    assert snapshot(node.root) == state
    # ...but it still says that containerd has not loaded the change yet.
    assert "to do: systemctl restart containerd  (load the config an earlier run changed" in again.stdout


def test_dry_run_prints_every_change_and_makes_none(node: Node) -> None:
    state = snapshot(node.root)
    r = node.install("--dry-run")
    assert snapshot(node.root) == state
    out = r.stdout
    assert "dry run, nothing is changed" in out
    for what in ("would create /opt/kybernate/versions/0.1.0-",
                 "would write /usr/local/bin/containerd-shim-kybernate-v1", "would write /usr/local/bin/kybernate-hookd",
                 "would write /etc/kybernate/runtime.toml",
                 "would write /etc/systemd/system/kybernate-hookd.service",
                 "would enable kybernate-hookd", "would back up /etc/containerd/config.toml to",
                 "would write /usr/local/bin/kybernate-shimd", f"would write {SHIMD_UNIT}",
                 "would enable kybernate-shimd", "would write /usr/local/bin/containerd-shim-kybernate-v1.py",
                 "then run: systemctl restart containerd"):
        assert what in out, f"{what!r} missing from:\n{out}"
    if node.version == "2.1":
        assert f"would write {DROPIN}" in out
        assert f'+imports = ["{DROPIN}"]' in out  # the diff
    else:
        assert "would edit /etc/containerd/config.toml: append the kybernate runtime block" in out
        assert '+[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kybernate]' in out

    node.install()
    state = snapshot(node.root)
    r = node.install("--uninstall", "--dry-run")
    assert snapshot(node.root) == state
    assert "would remove /usr/local/bin/kybernate-hookd" in r.stdout


def contents(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under root with its type, mode and bytes (or link target): what "the same tree" means."""
    return {k: v[:2] + v[3:] if v[0] == "file" else v for k, v in snapshot(root).items()}


def test_uninstall_gives_the_node_back_exactly(node: Node) -> None:
    """Install, then uninstall: the node tree is the one before, path for path and byte for byte."""
    before = contents(node.root)
    node.install()
    manifest = json.loads(node.path("/opt/kybernate/manifest.json").read_text())
    assert manifest["backups"] == [str(b.relative_to(node.root)).join(("/", "")) for b in backups(node)]
    assert "/etc/kybernate/runtime.toml" in manifest["created"] and "/etc/kybernate" in manifest["created"]
    assert ("/etc/containerd/conf.d" in manifest["created"]) is (node.version == "2.1")
    dry = node.install("--uninstall", "--dry-run")
    assert "would remove /etc/kybernate/runtime.toml (as the install wrote it)" in dry.stdout
    assert "would remove the config backups /etc/containerd/config.toml.kybernate-backup-" in dry.stdout
    r = node.install("--uninstall")
    assert contents(node.root) == before
    assert "to do: systemctl restart containerd" in r.stdout
    assert "to do: systemctl stop kybernate-hookd" in r.stdout

    state = snapshot(node.root)
    again = node.install("--uninstall")
    assert "nothing to change: Kybernate is not installed here" in again.stdout
    assert snapshot(node.root) == state


def test_uninstall_keeps_an_edited_runtime_toml_and_says_so(node: Node) -> None:
    before = contents(node.root)
    node.install()
    node.path("/etc/kybernate/runtime.toml").write_text("# the operator's settings\n")
    r = node.install("--uninstall")
    assert ("note: kept /etc/kybernate/runtime.toml: changed since the install wrote it (the operator's settings)"
            in r.stdout)
    assert "kept /etc/kybernate: not empty (runtime.toml)" in r.stdout
    assert node.path("/etc/kybernate/runtime.toml").read_text() == "# the operator's settings\n"
    after = contents(node.root)
    assert set(after) - set(before) == {"etc/kybernate", "etc/kybernate/runtime.toml"}
    assert {k: v for k, v in after.items() if k in before} == before  # config.toml byte for byte, no backups


def test_uninstall_keeps_the_backups_when_the_operator_changed_the_config(make_node: Callable[..., Node]) -> None:
    n = make_node("1.6")
    n.install()
    old, new = OPERATOR_SETTING[1], "max_container_log_line_size = 777"
    n.config.write_text(n.config.read_text().replace(old, new))  # the operator's edit, after the install
    made = backups(n)
    r = n.install("--uninstall")
    assert n.config.read_text() == n.original.replace(old, new)  # the edit stays, the block goes
    assert set(made) < set(backups(n))  # the install's backup and the uninstall's own
    assert "differs from the one before the install (changed since), so they may still be needed" in r.stdout


def test_operators_runtime_toml_is_never_overwritten(make_node: Callable[..., Node]) -> None:
    n = make_node("2.1")
    n.path("/etc/kybernate").mkdir(parents=True)
    n.path("/etc/kybernate/runtime.toml").write_text("SystemdCgroup = true\n")
    r = n.install()
    assert n.path("/etc/kybernate/runtime.toml").read_text() == "SystemdCgroup = true\n"
    assert "kept /etc/kybernate/runtime.toml" in r.stdout
    r = n.install("--uninstall")  # nor removed: it was there before
    assert "note: kept /etc/kybernate/runtime.toml: it was there before the install" in r.stdout
    assert n.path("/etc/kybernate/runtime.toml").read_text() == "SystemdCgroup = true\n"


# ---- refusals: each with a clear message and nothing changed ---------------------------------------------


@pytest.mark.parametrize("config, message", [
    ("version = 1\nroot = '/var/lib/containerd'\n", "has version = 1; this installer knows config version 2"),
    ("version = 4\n", "has version = 4"),
    ("root = '/var/lib/containerd'\n", "no `version` key (containerd reads that as version 1)"),
    ("version = 3\n[plugins\n", "is not valid TOML"),
    (None, "does not exist (containerd runs on built-in defaults). Generate it first: `containerd config default"),
], ids=["v1", "v4", "no-version", "broken", "missing"])
def test_a_config_it_cannot_handle_is_refused_and_nothing_changes(
    make_node: Callable[..., Node], config: str | None, message: str
) -> None:
    n = make_node("2.1", config)
    state = snapshot(n.root)
    r = n.install(check=False)
    assert r.returncode == 1
    assert message in r.stderr, r.stderr
    assert r.stderr.startswith("install.py: error: ") and r.stdout == ""
    assert snapshot(n.root) == state


def test_a_python_older_than_3_11_is_refused(make_node: Callable[..., Node]) -> None:
    n = make_node("2.1")
    n.path("/usr/bin/python3").symlink_to("python3.9")
    n.path("/usr/bin/python3.9").write_bytes(b"")  # the version is read from the name: never run
    state = snapshot(n.root)
    r = n.install(python=None, check=False)
    assert r.returncode == 1
    assert "the node's /usr/bin/python3.9 is Python 3.9; Kybernate needs 3.11 or newer" in r.stderr
    assert "install python3.11 or newer and pass --python" in r.stderr
    assert snapshot(n.root) == state
    # With a newer one beside it, the message names it.
    n.path("/usr/bin/python3.12").write_bytes(b"")
    r = n.install(python=None, check=False)
    assert "this node has /usr/bin/python3.12: pass --python with one" in r.stderr


def test_no_python_on_the_node_is_refused(make_node: Callable[..., Node]) -> None:
    n = make_node("2.1")
    r = n.install(python=None, check=False)
    assert r.returncode == 1
    assert "no python3 on the node at /usr/bin/python3 or /usr/local/bin/python3" in r.stderr


def test_wheels_for_another_python_are_refused(make_node: Callable[..., Node], payload: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    tag = f"cp3{sys.version_info[1]}"
    for w in payload.glob("*.whl"):
        shutil.copy(w, other / (w.name.replace(f"-{tag}-{tag}-", "-cp399-cp399-")
                                if w.name.startswith("grpcio-") else w.name))
    n = make_node("2.1")
    state = snapshot(n.root)
    r = n.install(wheels=other, check=False)
    assert r.returncode == 1
    assert "no wheel of grpcio (needed by kybernate) for the host (only grpcio-" in r.stderr
    assert f"which does not fit CPython 3.{sys.version_info[1]}" in r.stderr
    assert snapshot(n.root) == state


def test_an_unwritable_directory_is_refused_before_anything_changes(make_node: Callable[..., Node]) -> None:
    n = make_node("2.1")
    state = snapshot(n.root)
    argv = [sys.executable, str(INSTALLER), "--host-root", str(n.root), "--wheels", str(n.payload),
            "--python", HOST_PYTHON, "--extras", ""]
    # A read-only bind mount in a private mount namespace of its own: nothing outside sees it.
    bin_dir = n.path("/usr/local/bin")
    script = f'mount --bind -o ro "{bin_dir}" "{bin_dir}" && exec "$@"'
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot write /usr/local/bin on the node (read-only filesystem)" in r.stderr
    assert snapshot(n.root) == state


def test_restarting_needs_a_way_to_the_nodes_systemd(node: Node) -> None:
    state = snapshot(node.root)
    r = node.install("--restart-containerd", check=False)
    assert r.returncode == 1
    assert "need the node's systemctl: run on the node (--host-root /) or in a pod with hostPID" in r.stderr
    assert snapshot(node.root) == state


def test_a_file_it_did_not_write_is_not_replaced(make_node: Callable[..., Node]) -> None:
    n = make_node("1.6")
    n.path("/usr/local/bin/kybernate-hookd").write_text("#!/bin/sh\necho mine\n")
    state = snapshot(n.root)
    r = n.install(check=False)
    assert r.returncode == 1
    assert "/usr/local/bin/kybernate-hookd exists and was not written by this installer" in r.stderr
    assert snapshot(n.root) == state


def test_a_runtime_the_operator_registered_by_hand_is_left_alone(make_node: Callable[..., Node]) -> None:
    by_hand = (ROOT / "containerd-config/config-v2-kybernate.toml").read_text()
    text = "version = 2\n" + by_hand
    n = make_node("1.6", text)
    r = n.install()
    assert n.config.read_text() == text and not backups(n)
    assert "already registers runtimes.kybernate outside this installer's block: left as it is" in r.stdout


def test_v2_refuses_when_an_import_holds_the_cri_section(make_node: Callable[..., Node]) -> None:
    n = make_node("1.6")
    text = n.original.replace("imports = []", 'imports = ["/etc/containerd/registry.toml"]')
    n.config.write_text(text)
    n.path("/etc/containerd/registry.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n')
    r = n.install(check=False)
    assert r.returncode == 1
    assert "/etc/containerd/registry.toml (imported by /etc/containerd/config.toml) has a " in r.stderr
    assert "containerd 1.6/1.7 replace the whole CRI section" in r.stderr
    assert n.config.read_text() == text


def test_v3_an_import_glob_that_covers_the_drop_in_is_enough(make_node: Callable[..., Node]) -> None:
    n = make_node("2.1")
    text = n.original.replace("imports = []", "imports = ['/etc/containerd/conf.d/*.toml']")
    n.config.write_text(text)
    r = n.install()
    assert n.config.read_text() == text and not backups(n)
    assert n.path(DROPIN).exists()
    assert "imports already covers /etc/containerd/conf.d/kybernate.toml ('/etc/containerd/conf.d/*.toml')" in r.stdout
    n.install("--uninstall")
    assert n.config.read_text() == text and not n.path(DROPIN).exists()


# ---- the imports edit, on the shapes config files come in (pure text functions) ---------------------


@pytest.mark.parametrize("before, after", [
    ("version = 3\nimports = []\n", f'version = 3\nimports = ["{DROPIN}"]\n'),
    ("version = 3\n", f'version = 3\nimports = ["{DROPIN}"]\n'),
    ("version = 3  # new\n[grpc]\n", f'version = 3  # new\nimports = ["{DROPIN}"]\n[grpc]\n'),
    ("imports = ['/a.toml']\nversion = 3\n", f"imports = ['/a.toml', \"{DROPIN}\"]\nversion = 3\n"),
    ("version = 3\nimports = [\n  '/a.toml',  # mine\n]\n",
     f"version = 3\nimports = [\n  '/a.toml',  # mine\n  \"{DROPIN}\",\n]\n"),
    ("version = 3\nimports = [\n    '/a.toml'\n]\n", f"version = 3\nimports = [\n    '/a.toml',\n    \"{DROPIN}\"\n]\n"),
], ids=["empty", "absent", "absent-commented", "one", "multiline-trailing-comma", "multiline"])
def test_imports_edit_round_trips(before: str, after: str) -> None:
    added = install_py._add_import(before, DROPIN)
    assert added == after
    assert tomllib.loads(added)["imports"] == [*tomllib.loads(before).get("imports", []), DROPIN]
    removed = install_py._drop_import(added, DROPIN)
    assert tomllib.loads(removed).get("imports", []) == tomllib.loads(before).get("imports", [])
    if "imports" in before:
        assert removed == before


# ---- wheel selection rules (pure functions, on PyPA's packaging) --------------------------------------------


@pytest.mark.parametrize("spec, ok", [
    (">=3.8,!=3.11.2", True), ("==3.*", True), (">=3.11", True), ("", True), ("~=3.10", True),
    (">=3.12", False), ("!=3.11.*", False), ("<3.11", False), ("==3.10.*", False),
])
def test_requires_python_against_the_nodes_3_11(spec: str, ok: bool) -> None:
    assert install_py._python_ok(spec, (3, 11)) is ok


def test_dependencies_under_a_marker_follow_the_nodes_interpreter(tmp_path: Path) -> None:
    pk = install_py._packaging(tmp_path)
    env = install_py._marker_environment((3, 11), "x86_64")
    for line, wanted in [
        ("grpcio>=1.60", True),
        ('tomli>=1; python_version < "3.11"', False),
        ('typing-extensions; python_version >= "3.11"', True),
        ('pywin32; sys_platform == "win32"', False),
        ('uvloop; platform_machine == "x86_64" and sys_platform == "linux"', True),
        ('pytest; extra == "dev"', False),
    ]:
        req = pk.requirements.Requirement(line)
        assert (req.marker is None or req.marker.evaluate(env)) is wanted, line


def test_wheel_tags_that_run_on_the_node(tmp_path: Path) -> None:
    pk = install_py._packaging(tmp_path)
    tags = install_py._host_tags(pk, 11, "x86_64")
    def fits(name: str) -> bool:
        return bool(install_py._parse_wheel(Path(name), pk).tags & tags)
    assert fits("kybernate-0.1.0-py3-none-any.whl")
    assert fits("grpcio-1.60.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
    assert fits("cryptography-42.0.0-cp39-abi3-manylinux_2_28_x86_64.whl")
    assert not fits("grpcio-1.60.0-cp312-cp312-manylinux_2_17_x86_64.whl")  # another python
    assert not fits("grpcio-1.60.0-cp311-cp311-musllinux_1_1_x86_64.whl")  # musl, not glibc
    assert not fits("grpcio-1.60.0-cp311-cp311-manylinux_2_17_aarch64.whl")  # another machine


# ---- the venv runs on the node's python -------------------------------------------------------------------


def test_the_venv_and_launchers_run_on_the_nodes_python(make_node: Callable[..., Node]) -> None:
    n = make_node("2.1")
    n.install()
    venv = installed_venv(n)
    venv_python = n.path(f"{venv}/bin/python3")
    code = ("import sys, grpc, google.protobuf, pyroute2, pynvml, kybernate.hooks.hookd.daemon, kybernate.shim.cli; "
            "print(sys.prefix, grpc.__version__)")
    r = subprocess.run([str(venv_python), "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    prefix, grpc_version = r.stdout.split()
    assert prefix == str(n.path(venv)) and grpc_version == grpc.__version__
    # The launchers' shebang names the node's path; run them with that interpreter here.
    shim = subprocess.run([str(venv_python), str(n.path("/usr/local/bin/containerd-shim-kybernate-v1")), "-v"],
                          capture_output=True, text=True, timeout=30)
    assert shim.returncode == 0 and "0.1.0" in shim.stdout, shim.stdout + shim.stderr
    hookd = subprocess.run([str(venv_python), str(n.path("/usr/local/bin/kybernate-hookd")), "--help"],
                           capture_output=True, text=True, timeout=30)
    assert hookd.returncode == 0 and "--socket" in hookd.stdout, hookd.stderr


def test_the_venv_is_compiled_once_with_code_that_names_its_final_directory(make_node: Callable[..., Node]) -> None:
    """No shim, hookd or CLI start compiles modules again (a node with PYTHONDONTWRITEBYTECODE would every time)."""
    import marshal

    n = make_node("2.1")
    n.install()
    venv = installed_venv(n)
    site_in_venv = f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    site = n.path(f"{venv}/{site_in_venv}")
    source = site / "kybernate" / "shim" / "manager.py"
    cached = Path(importlib.util.cache_from_source(str(source)))
    assert cached.is_file(), f"no bytecode for {source}"
    code = marshal.loads(cached.read_bytes()[16:])
    # The code names the directory the venv was renamed to, never the one it was built in.
    assert code.co_filename == f"{venv}/{site_in_venv}/kybernate/shim/manager.py"
    assert (site / "grpc" / "__pycache__").is_dir()


# ---- the strongest check: the real containerd loads what the installer wrote ------------------------------


def _runnable_config(node: Node, run_dir: Path) -> Path:
    """The node's config.toml as containerd here can run it: root, state, sockets and the drop-in path moved.

    Only paths change; every setting, table and the kybernate entry stay as the installer left them.
    """
    text = node.config.read_text()
    for old, new in (("/var/lib/containerd", run_dir / "root"), ("/run/containerd", run_dir / "state"),
                     ("/opt/containerd", run_dir / "opt"), ("/var/run/nri", run_dir / "nri"),
                     (DROPIN, node.path(DROPIN))):
        text = text.replace(old, str(new))
    path = run_dir / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture
def run_dir() -> Iterator[Path]:
    d = RUN_BASE / f"inst-{secrets.token_hex(4)}"  # short: unix socket paths must fit in 108 bytes
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _dump(stack: Stack, version: str, config: Path) -> dict[str, Any]:
    r = subprocess.run([str(stack.containerd[version].containerd), "--config", str(config), "config", "dump"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return tomllib.loads(r.stdout)


def test_containerd_config_dump_shows_the_runtime_and_the_operators_settings(
    node: Node, stack: Stack, run_dir: Path
) -> None:
    node.install()
    dump = _dump(stack, node.version, _runnable_config(node, run_dir))
    cri = CRI[node.version]
    runtimes = _dig(dump, "plugins", cri, "containerd", "runtimes")
    kyb = runtimes["kybernate"]
    assert kyb["runtime_type"] == RUNTIME_TYPES[node.version]
    assert kyb["pod_annotations"] == kyb["container_annotations"] == ["kybernate.io/*"]
    assert kyb["options"] == OPTIONS[node.version]
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert _dig(dump, "plugins", cri, "max_container_log_line_size") == 12345


def test_a_started_containerd_serves_the_runtime_through_cri(node: Node, stack: Stack, run_dir: Path) -> None:
    node.install()
    config = _runnable_config(node, run_dir)
    log_path = run_dir / "containerd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(stack.containerd[node.version].containerd), "--config", str(config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = _cri_status_info(run_dir / "state" / "containerd.sock", proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    cri_config = json.loads(info["config"])
    kyb = cri_config["containerd"]["runtimes"]["kybernate"]
    assert kyb["runtimeType"] == RUNTIME_TYPES[node.version]
    assert kyb["PodAnnotations"] == kyb["ContainerAnnotations"] == ["kybernate.io/*"]
    assert kyb["options"] == OPTIONS[node.version]
    assert cri_config["containerd"]["runtimes"]["runc"]["runtimeType"] == "io.containerd.runc.v2"
    # 1.6 spells it maxContainerLogSize, 2.1 maxContainerLogLineSize.
    assert cri_config.get("maxContainerLogSize", cri_config.get("maxContainerLogLineSize")) == 12345


def test_containerd_2_1_loads_a_version_2_config_with_the_block(
    make_node: Callable[..., Node], stack: Stack, run_dir: Path
) -> None:
    """An operator who upgrades containerd and keeps the old version 2 file: 2.x migrates it, entry and all."""
    n = make_node("1.6")
    n.install()
    dump = _dump(stack, "2.1", _runnable_config(n, run_dir))
    kyb = _dig(dump, "plugins", CRI["2.1"], "containerd", "runtimes", "kybernate")
    assert kyb["runtime_type"] == RUNTIME_TYPE and kyb["pod_annotations"] == ["kybernate.io/*"]


def test_why_version_2_gets_no_drop_in_containerd_1_6_replaces_the_cri_section(
    make_node: Callable[..., Node], stack: Stack, run_dir: Path
) -> None:
    """containerd 1.6 with the entry as an imported drop-in: the operator's whole CRI section is gone."""
    n = make_node("1.6")
    n.config.write_text(n.original.replace("imports = []", f'imports = ["{DROPIN}"]'))
    n.path(DROPIN).parent.mkdir(parents=True)
    n.path(DROPIN).write_text("version = 2\n" + (ROOT / "containerd-config/config-v2-kybernate.toml").read_text())
    dump = _dump(stack, "1.6", _runnable_config(n, run_dir))
    runtimes = _dig(dump, "plugins", CRI["1.6"], "containerd", "runtimes")
    assert "kybernate" in runtimes and "runc" not in runtimes
    assert _dig(dump, "plugins", CRI["1.6"], "max_container_log_line_size") == 16384  # the default again


# ---- CRI Status, by hand: the project's cri.proto subset has no Status message ---------------------------


def _cri_status_info(sock: Path, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 8.0) -> dict[str, str]:
    """RuntimeService/Status(verbose=true).info, encoded and decoded by hand (field 1 verbose; field 2 info)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"containerd exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if sock.exists():
            with grpc.insecure_channel(f"unix://{sock}") as channel:
                status = channel.unary_unary("/runtime.v1.RuntimeService/Status",
                                             request_serializer=lambda b: b, response_deserializer=lambda b: b)
                try:
                    raw = status(b"\x08\x01", timeout=2)
                except grpc.RpcError as e:  # not serving CRI yet
                    last = e
                else:
                    info = {}
                    for field_no, value in _proto_fields(raw):
                        if field_no == 2:
                            entry = dict(_proto_fields(value))
                            info[entry[1].decode()] = entry[2].decode()
                    return info
        time.sleep(0.05)
    raise AssertionError(f"no CRI Status from {sock} ({last}):\n{log_path.read_text()[-3000:]}")


def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(buf):
        key = varint()
        if key & 7 == 0:
            yield key >> 3, varint()
        elif key & 7 == 2:
            n = varint()
            yield key >> 3, buf[i:i + n]
            i += n
        else:
            raise ValueError(f"unexpected wire type {key & 7}")


# ---- systemctl and the restart gate, with stand-ins --------------------------------------------------------
# A temporary root has no systemd to talk to. These stand-ins for `systemctl` and `containerd` only log how
# they were called (and the containerd one answers `config dump`), so the order of the commands, the
# restart only on a change, and the refusal to restart into a config containerd rejects can be checked.


@pytest.fixture
def stand_ins(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bin_dir = tmp_path / "stand-ins"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    log.touch()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "systemctl $*" >> {log}\n')
    (bin_dir / "containerd").write_text(
        f'#!/bin/sh\necho "containerd $*" >> {log}\n'
        'if [ -n "$KYB_TEST_BAD_CONFIG" ]; then echo "failed to load TOML: bad config" >&2; exit 1; fi\n'
        f'echo \'runtime_type = "{RUNTIME_TYPE}"\'\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


def _install_direct(node: Node, env: dict[str, str], *args: str,
                    wheels: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(INSTALLER), "--host-root", str(node.root), "--host-exec", "direct"]
    if "--uninstall" not in args:
        argv += ["--wheels", str(wheels or node.payload), "--python", HOST_PYTHON, "--extras", ""]
    return subprocess.run(argv + list(args), capture_output=True, text=True, timeout=60, env=env)


def test_restart_and_start_run_in_order_and_only_on_a_change(
    make_node: Callable[..., Node], stand_ins: tuple[dict[str, str], Path]
) -> None:
    env, log = stand_ins
    n = make_node("2.1")
    n.path("/run/systemd/system").mkdir(parents=True)
    r = _install_direct(n, env, "--start-hookd", "--restart-containerd")
    assert r.returncode == 0, r.stdout + r.stderr
    assert log.read_text().splitlines() == [
        "systemctl daemon-reload",
        "systemctl restart kybernate-hookd",
        "systemctl restart kybernate-shimd",
        "containerd --config /etc/containerd/config.toml config dump",
        "systemctl restart containerd",
    ]
    assert not n.path("/opt/kybernate/containerd-restart-pending").exists()
    # With a C compiler the installer can run (--host-exec direct, this machine's cc), the shim binary is the
    # native client built from the version's source (the mark and the source's digest compiled in), with the
    # Python launcher of that version beside it as its fallback; kybernate-shimd's launcher names that version.
    venv = installed_venv(n)
    binary = n.path("/usr/local/bin/containerd-shim-kybernate-v1").read_bytes()
    source = (ROOT / "shim/native/shim_client.c").read_bytes()
    build_id = f"kybernate install.py native client {hashlib.sha256(source).hexdigest()[:16]}".encode()
    assert binary.startswith(b"\x7fELF") and build_id in binary
    # Linked statically (this machine has libc.a): no dynamic loader on each of containerd's execs.
    assert not _has_interpreter(binary)
    # The pass lane, built into the version's venv where its pod daemons load it (shim/passlane.py).
    lane = n.path(f"{venv}/lib/kybernate-passlane.so")
    lane_source = (ROOT / "shim/native/passlane.c").read_bytes()
    assert f"kybernate install.py pass lane {hashlib.sha256(lane_source).hexdigest()[:16]}".encode() in lane.read_bytes()
    assert ctypes.CDLL(str(lane)).kyb_lane_new  # it loads, and is the lane
    for launcher in ("containerd-shim-kybernate-v1.py", "kybernate-shimd"):
        assert n.path(f"/usr/local/bin/{launcher}").read_text().startswith(f"#!{venv}/bin/python3\n")
    assert os.readlink(n.path(SHIMD_WANTS)) == SHIMD_UNIT
    # Built once: a second run leaves the binary as it is and only makes sure both daemons run.
    state = snapshot(n.root)
    log.write_text("")
    r = _install_direct(n, env, "--start-hookd", "--restart-containerd")
    assert r.returncode == 0 and "nothing to change" in r.stdout
    assert log.read_text().splitlines() == ["systemctl start kybernate-hookd", "systemctl start kybernate-shimd"]
    assert snapshot(n.root) == state
    # The uninstall stops both (the resident with KillMode=process: running pods keep their shims) and removes
    # the native client, its fallback, the resident's launcher and its unit with the rest.
    log.write_text("")
    r = _install_direct(n, env, "--uninstall", "--stop-hookd", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert log.read_text().splitlines()[:3] == [
        "systemctl stop kybernate-hookd", "systemctl stop kybernate-shimd", "systemctl daemon-reload"]
    for gone in [*(f"/usr/local/bin/{n}" for n in LAUNCHERS), SHIMD_UNIT, SHIMD_WANTS]:
        assert not os.path.lexists(n.path(gone)), gone


def test_a_native_client_that_does_not_build_leaves_the_python_launcher(
    make_node: Callable[..., Node], stand_ins: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, _ = stand_ins
    broken = tmp_path / "broken-cc"
    broken.mkdir()
    (broken / "cc").write_text("#!/bin/sh\necho 'cc: internal compiler error' >&2\nexit 1\n")
    (broken / "cc").chmod(0o755)
    n = make_node("1.6")
    r = _install_direct(n, {**env, "PATH": f"{broken}:{env['PATH']}"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: building the native shim client failed (cc: internal compiler error)" in r.stdout
    assert "note: building the pass lane failed (cc: internal compiler error)" in r.stdout
    assert not n.path(f"{installed_venv(n)}/lib/kybernate-passlane.so").exists()
    launcher = n.path("/usr/local/bin/containerd-shim-kybernate-v1").read_text()
    assert launcher == n.path("/usr/local/bin/containerd-shim-kybernate-v1.py").read_text()
    assert launcher.startswith(f"#!{installed_venv(n)}/bin/python3\n")
    assert not n.path("/usr/local/bin/.containerd-shim-kybernate-v1.new").exists()
    # A later run with a working compiler builds it (what it failed to do is not remembered as done).
    r = _install_direct(n, env)
    assert r.returncode == 0 and "build /usr/local/bin/containerd-shim-kybernate-v1 (the native shim client)" in r.stdout
    assert n.path("/usr/local/bin/containerd-shim-kybernate-v1").read_bytes().startswith(b"\x7fELF")
    assert n.path(f"{installed_venv(n)}/lib/kybernate-passlane.so").read_bytes().startswith(b"\x7fELF")


def test_a_node_without_a_static_c_library_gets_the_native_client_linked_dynamically(
    make_node: Callable[..., Node], stand_ins: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, _ = stand_ins
    real_cc = shutil.which("cc")
    assert real_cc is not None
    no_static = tmp_path / "no-static-cc"
    no_static.mkdir()
    # The node's compiler without libc.a: -static fails as the linker says it there, anything else builds.
    (no_static / "cc").write_text(
        "#!/bin/sh\nfor a; do [ \"$a\" = -static ] && { echo 'ld: cannot find -lc' >&2; exit 1; }; done\n"
        f"exec {real_cc} \"$@\"\n")
    (no_static / "cc").chmod(0o755)
    n = make_node("1.6")
    r = _install_direct(n, {**env, "PATH": f"{no_static}:{env['PATH']}"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "building the native shim client failed" not in r.stdout
    binary = n.path("/usr/local/bin/containerd-shim-kybernate-v1").read_bytes()
    assert binary.startswith(b"\x7fELF") and _has_interpreter(binary)


def _has_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF names a dynamic loader (a PT_INTERP program header)."""
    offset, size, count = struct.unpack_from("<Q", elf, 0x20)[0], *struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, offset + i * size)[0] == 3 for i in range(count))


def test_no_restart_into_a_config_containerd_rejects(
    make_node: Callable[..., Node], stand_ins: tuple[dict[str, str], Path]
) -> None:
    env, log = stand_ins
    n = make_node("1.6")
    n.path("/run/systemd/system").mkdir(parents=True)
    r = _install_direct(n, {**env, "KYB_TEST_BAD_CONFIG": "1"}, "--restart-containerd")
    assert r.returncode == 1
    assert "does not accept the new config (failed to load TOML: bad config); containerd NOT restarted" in r.stderr
    assert "systemctl restart containerd" not in log.read_text()
    assert n.path("/opt/kybernate/containerd-restart-pending").exists()
    # The next run has nothing to change but still owes the restart.
    r = _install_direct(n, env, "--restart-containerd")
    assert r.returncode == 0 and "nothing to change" in r.stdout
    assert log.read_text().splitlines()[-1] == "systemctl restart containerd"
    assert not n.path("/opt/kybernate/containerd-restart-pending").exists()


def test_uninstall_refuses_while_a_kybernate_shim_runs(
    make_node: Callable[..., Node], stand_ins: tuple[dict[str, str], Path]
) -> None:
    env, _ = stand_ins
    n = make_node("2.1")
    n.install()
    state = snapshot(n.root)
    shim = subprocess.Popen(["bash", "-c", "exec -a /usr/local/bin/containerd-shim-kybernate-v1 sleep 60"])
    try:
        deadline = time.monotonic() + 5  # until the exec has happened
        while b"containerd-shim-kybernate-v1" not in Path(f"/proc/{shim.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in shim did not start"
            time.sleep(0.01)
        r = _install_direct(n, env, "--uninstall")
    finally:
        shim.kill()
        shim.wait()
    assert r.returncode == 1
    assert "kybernate shim(s) still run (pids " in r.stderr and str(shim.pid) in r.stderr
    assert snapshot(n.root) == state


def test_v2_install_and_uninstall_keep_trailing_blank_lines(make_node: Callable[..., Node]) -> None:
    """The operator's file ends in blank lines: a re-run changes nothing, the uninstall gives it back byte for byte."""
    n = make_node("1.6")
    text = n.original + "\n\n"
    n.config.write_text(text)
    n.install()
    installed = n.config.read_text()
    assert installed.startswith(text + "\n# >>> kybernate runtime")
    assert "nothing to change" in n.install().stdout and n.config.read_text() == installed
    n.install("--uninstall")
    assert n.config.read_text() == text


# ---- versions: an upgrade installs beside the running version ---------------------------------------------


def _stand_in(node: Node, argv0: str) -> subprocess.Popen[bytes]:
    """A process of the node (a mount namespace of its own where the node's /opt/kybernate is at that path)
    whose command line starts with argv0, as a shim started from that version's launcher."""
    script = (f'mount -t tmpfs tmpfs /opt && mkdir /opt/kybernate && mount --bind "{node.path("/opt/kybernate")}" '
              f"/opt/kybernate && exec -a {shlex.quote(argv0)} sleep 60")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child", "bash", "-c",
                             script])
    deadline = time.monotonic() + 5  # until the exec has happened
    def started() -> bool:
        return any(_cmdline(p).startswith(argv0.encode()) for p in _descendants(proc.pid))

    while not started():
        assert time.monotonic() < deadline, "the stand-in did not start"
        time.sleep(0.01)
    return proc


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile (the mount commands before the exec)
        return b""


def _descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def test_an_upgrade_keeps_the_version_a_process_still_uses(
    make_node: Callable[..., Node], payload_v2: Path, stand_ins: tuple[dict[str, str], Path]
) -> None:
    env, _ = stand_ins
    n = make_node("2.1")
    assert _install_direct(n, env).returncode == 0
    v1 = installed_venv(n)
    v1_files = contents(n.path(v1))
    # A process of the node running the first version (the installer finds it through /proc/<pid>/root).
    user = _stand_in(n, v1 + "/bin/python3")
    try:
        r = _install_direct(n, env, wheels=payload_v2)
        assert r.returncode == 0, r.stdout + r.stderr
        v2 = str(json.loads(n.path("/opt/kybernate/installed.json").read_text())["venv"])
        assert v2.startswith("/opt/kybernate/versions/0.1.0+two-") and v2 != v1
        (sleeper,) = [p for p in _descendants(user.pid) if _cmdline(p).startswith(b"/opt")]
        assert f"note: kept {v1}: still in use by pid(s) {sleeper}" in r.stdout
        assert contents(n.path(v1)) == v1_files  # untouched: its process keeps its own files
        # The launchers name the new version; the native client (--host-exec direct: built with this machine's
        # cc) names none and falls back to the launcher beside it: the same source is not rebuilt.
        for name in LAUNCHERS[1:]:
            assert n.path(f"/usr/local/bin/{name}").read_text().startswith(f"#!{v2}/bin/python3\n")
        assert n.path("/usr/local/bin/containerd-shim-kybernate-v1").read_bytes().startswith(b"\x7fELF")
        assert "build /usr/local/bin/containerd-shim-kybernate-v1" not in r.stdout
        assert os.readlink(n.path("/opt/kybernate/current")) == v2.removeprefix("/opt/kybernate/")
    finally:
        user.kill()
        user.wait()
    # The next run, with that process gone, removes the old version (and changes nothing else); the node's
    # other processes (here one standing for its containerd) show that it sees the node's processes at all.
    other = _stand_in(n, "/usr/local/bin/containerd")
    try:
        r = _install_direct(n, env, wheels=payload_v2)
    finally:
        other.kill()
        other.wait()
    assert r.returncode == 0 and "nothing to change" in r.stdout
    assert f"remove {v1} (an earlier version no process uses)" in r.stdout
    assert sorted(p.name for p in n.path("/opt/kybernate/versions").iterdir()) == [v2.rsplit("/", 1)[1]]


def test_without_a_view_of_the_nodes_processes_old_versions_stay(
    make_node: Callable[..., Node], payload_v2: Path
) -> None:
    n = make_node("1.6")
    n.install()
    v1 = installed_venv(n)
    r = n.install(wheels=payload_v2)  # --host-root elsewhere, no --host-exec: the node's pids are not visible
    assert "note: kept 1 earlier version(s) under /opt/kybernate/versions: this run cannot see" in r.stdout
    assert n.path(v1).is_dir()
    n.install("--uninstall")  # the uninstall takes every version
    assert not n.path("/opt/kybernate").exists()


def test_the_s3_extra_is_installed_by_default(make_node: Callable[..., Node], payload_s3: Path) -> None:
    """The store's S3 tier imports boto3 from the node's venv; without its wheels the install names them."""
    n = make_node("2.1")
    r = n.install(check=False, extras=None)  # the plain payload lacks boto3
    assert r.returncode == 1
    assert "no wheel of boto3 (needed by kybernate[s3]) for the host (none at all); or leave the extra out" in r.stderr
    n.install(wheels=payload_s3, extras=None)
    record = json.loads(n.path("/opt/kybernate/installed.json").read_text())
    assert record["extras"] == ["s3"]
    names = {w.split("-")[0].lower() for w in record["wheels"]}
    assert {"boto3", "botocore", "s3transfer", "jmespath", "python_dateutil", "six", "urllib3"} <= names
    venv_python = n.path(f"{record['venv']}/bin/python3")
    code = "import boto3, kybernate.hooks.api.store_s3 as s; print(boto3.__version__, s.__name__)"
    r2 = subprocess.run([str(venv_python), "-c", code], capture_output=True, text=True, timeout=60)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.split()[0] == importlib.metadata.version("boto3")


def test_a_rollback_reuses_the_kept_version_as_it_is(
    make_node: Callable[..., Node], payload_v2: Path, stand_ins: tuple[dict[str, str], Path]
) -> None:
    """Back to the first version while its shim still runs: its directory is switched to, never rebuilt."""
    env, _ = stand_ins
    n = make_node("1.6")
    assert _install_direct(n, env).returncode == 0
    v1 = installed_venv(n)
    v1_files = snapshot(n.path(v1))  # mtimes too: not one file rewritten
    user = _stand_in(n, v1 + "/bin/python3")
    try:
        assert _install_direct(n, env, wheels=payload_v2).returncode == 0
        v2 = str(json.loads(n.path("/opt/kybernate/installed.json").read_text())["venv"])
        r = _install_direct(n, env)
    finally:
        user.kill()
        user.wait()
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"switch back to {v1} (kept from an earlier install: reused as it is)" in r.stdout
    assert f"remove {v2} (an earlier version no process uses)" in r.stdout
    assert installed_venv(n) == v1 and snapshot(n.path(v1)) == v1_files
    for name in LAUNCHERS[1:]:  # the first: the native client (this machine's cc), which names no version
        assert n.path(f"/usr/local/bin/{name}").read_text().startswith(f"#!{v1}/bin/python3\n")
    assert os.readlink(n.path("/opt/kybernate/current")) == v1.removeprefix("/opt/kybernate/")


def test_a_shim_that_names_no_version_keeps_every_version(
    make_node: Callable[..., Node], payload_v2: Path, stand_ins: tuple[dict[str, str], Path]
) -> None:
    """The node's shim runs through the installed launcher but its command line names no version directory
    (a launcher of another kind): which version it uses is unknown, so none is removed."""
    env, _ = stand_ins
    n = make_node("2.1")
    assert _install_direct(n, env).returncode == 0
    v1 = installed_venv(n)
    user = _stand_in(n, "/usr/local/bin/containerd-shim-kybernate-v1")
    try:
        r = _install_direct(n, env, wheels=payload_v2)
    finally:
        user.kill()
        user.wait()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note: kept every earlier version under /opt/kybernate/versions: kybernate shim(s) [" in r.stdout
    assert n.path(v1).is_dir()
