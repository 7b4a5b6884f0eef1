#!/usr/bin/env python3
"""Install Kybernate on a node, register it in containerd's config, or take it away again.

Runs as root, on the node itself (`--host-root /`, the default) or in a privileged pod that has the
node's directories mounted under `--host-root` (see packaging/kubernetes/daemonset.yaml). Standard
library only, but for PyPA's `packaging` when it picks wheels (the image has it; from a checkout, pip install
packaging or put its wheel into --wheels): it must run on whatever python3 is there. Its TOML edits stay
hand-written text edits, checked by re-parsing: tomlkit would need installing on the node too (the
uninstall copy runs there), and it re-lays out some arrays (a blank line before the next table, a comma
left behind on removal). Every path it prints is a path on the node.

What an install changes (host paths; nothing else is touched):

  /opt/kybernate/versions/<version>-<digest>/ a venv for the HOST's python3 (>= 3.11), built from the
                                              wheels in --wheels by unpacking them (no pip, no chroot); one
                                              per installed payload, so that an upgrade never changes the
                                              files of shims still running from the previous one
  /opt/kybernate/current                      a link to the newest versions/<...>/, for people (launchers
                                              name the versioned directory, never this link)
  /opt/kybernate/installed.json               what was installed (payload digest, python, version dir)
  /opt/kybernate/manifest.json                what the installs created on the node (paths, the runtime.toml
                                              they wrote, the config backups), so `--uninstall` removes
                                              exactly that and keeps whatever was there before
  /opt/kybernate/install.py                   a copy of this script, for `--uninstall` later
  /usr/local/bin/containerd-shim-kybernate-v1 launchers: run the versioned venv's python on the console
  /usr/local/bin/kybernate-hookd              entry points of the kybernate wheel
  /usr/local/bin/kybernate-shimd
  /usr/local/bin/containerd-shim-kybernate-v1 where the installer can run the node's C compiler (--host-exec):
                                              the native shim client, built from the version's
                                              shim/native/shim_client.c (as `make venv` does), with the Python
                                              launcher beside it as containerd-shim-kybernate-v1.py (its fallback)
  /etc/kybernate/runtime.toml                 only if missing: never overwrites the operator's file
  /etc/systemd/system/kybernate-hookd.service the hookd unit, enabled for multi-user.target (a symlink
                                              in multi-user.target.wants, what `systemctl enable` makes)
  /etc/systemd/system/kybernate-shimd.service the unit of the resident shim starter, enabled the same way
                                              (KillMode=process: pods' shim daemons outlive its restarts)
  containerd's config (--containerd-config, /etc/containerd/config.toml):
    version = 3 (containerd 2.x): drop-in <config dir>/conf.d/kybernate.toml, and its path added to the
        top-level `imports` unless an existing import already covers it;
    version = 2 (containerd 1.6/1.7): a marked block appended to config.toml itself. A drop-in is no
        option there: containerd 1.x replaces a plugin's WHOLE section with an imported file's section
        (containerd issue #5837, changed in 2.0 by #9982), so a drop-in naming the CRI plugin wipes the
        operator's CRI settings; with the stock `containerd config default` file the CRI plugin then
        refuses to load at all (tests/integration/test_installer.py shows both on 1.6.20).
    Every edit of config.toml is preceded by a backup, config.toml.kybernate-backup-<UTC time>.

An older version's directory stays while a process of the node (a pod's shim, the old hookd) still uses
it: its command line or a file it maps names that directory. Each later run (install, re-run or
uninstall) removes the versions no process uses any more; that needs a view of the node's processes (on
the node, or a pod with hostPID), else old versions are kept and the run says so.

Uninstall removes what the manifest lists: files and directories the installs created (a directory only
once empty), runtime.toml only if it still holds the bytes the install wrote (an edited one is kept, and
the run says so), and the config backups only when config.toml ends up byte for byte as it was before the
first install (else they are kept: the operator changed it since).

It restarts nothing unless asked: --restart-containerd restarts containerd (only when its config
changed, or a change from an earlier run has not been loaded yet) and --start-hookd (re)starts
kybernate-hookd and kybernate-shimd, both through the host's systemctl. Without them it prints the commands to run.
A second run with the same payload changes nothing and says so; --dry-run prints every change
(with diffs) and makes none. Exit status: 0 done (or nothing to do), 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import sys

# Before anything newer is imported, and in a spelling old interpreters parse: say it plainly.
if sys.version_info < (3, 11):  # noqa: UP036
    sys.stderr.write("install.py: error: needs Python 3.11 or newer to run (this is %d.%d)\n" % sys.version_info[:2])  # noqa: UP031
    sys.exit(1)

import argparse  # noqa: E402
import difflib  # noqa: E402
import email.parser  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402
import zipfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path, PurePosixPath  # noqa: E402
from typing import Any  # noqa: E402

RUNTIME_NAME = "kybernate"
RUNTIME_TYPE = "io.containerd.kybernate.v1"
# Per config version: containerd 2.x gets runc's type with our shim as runtime_path, so that CRI sees runc's
# features (recursive read-only mounts); see containerd-config/config-v3-kybernate.toml.
RUNTIME_TYPES = {2: RUNTIME_TYPE, 3: "io.containerd.runc.v2"}
MIN_HOST_PYTHON = (3, 11)
# Where CRI keeps its runtimes, per config version.
CRI_RUNTIME_PLUGIN = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
SNIPPETS = {2: "containerd-config/config-v2-kybernate.toml", 3: "containerd-config/config-v3-kybernate.toml"}
RUNTIME_TOML_SOURCE = "containerd-config/runtime.toml"
UNIT_SOURCE = "packaging/systemd/kybernate-hookd.service"
SHIMD_UNIT_SOURCE = "packaging/systemd/kybernate-shimd.service"
# The native shim client's source, in the kybernate wheel and so in each version's site-packages.
NATIVE_SOURCE = "kybernate/shim/native/shim_client.c"
# The pass lane's source (the pod daemon's pass-through below Python), built into each version's venv as
# lib/kybernate-passlane.so, where shim/passlane.py looks for it.
PASSLANE_SOURCE = "kybernate/shim/native/passlane.c"
PASSLANE_LIBRARY = "lib/kybernate-passlane.so"

DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
OPT = PurePosixPath("/opt/kybernate")
VERSIONS = OPT / "versions"
CURRENT = OPT / "current"
LEGACY_VENV = OPT / "venv"  # the single venv of installers before versions/: removed like an old version
RECORD = OPT / "installed.json"
MANIFEST = OPT / "manifest.json"
RESTART_PENDING = OPT / "containerd-restart-pending"
SELF_COPY = OPT / "install.py"
BIN_DIR = PurePosixPath("/usr/local/bin")
LAUNCHERS = ("containerd-shim-kybernate-v1", "kybernate-hookd", "kybernate-shimd")
# With the native shim client, the shim's Python launcher sits beside it under this name (its fallback).
SHIM_PY = BIN_DIR / "containerd-shim-kybernate-v1.py"
RUNTIME_TOML = PurePosixPath("/etc/kybernate/runtime.toml")
UNIT = PurePosixPath("/etc/systemd/system/kybernate-hookd.service")
UNIT_WANTS = PurePosixPath("/etc/systemd/system/multi-user.target.wants/kybernate-hookd.service")
SHIMD_UNIT = PurePosixPath("/etc/systemd/system/kybernate-shimd.service")
SHIMD_UNIT_WANTS = PurePosixPath("/etc/systemd/system/multi-user.target.wants/kybernate-shimd.service")
HOST_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")

# Every file this script writes carries this mark; it only ever replaces or removes files that do.
MARK = "kybernate install.py"
BLOCK_BEGIN = f"# >>> kybernate runtime: added by {MARK}; `install.py --uninstall` removes this block"
BLOCK_END = "# <<< kybernate runtime"
_BLOCK_RE = re.compile(r"(?ms)^# >>> kybernate runtime\b.*?^# <<< kybernate runtime[^\n]*(?:\n|\Z)")
_LAUNCHER_CALL = re.compile(r"^([\w.]+):([\w.]+)$")


class InstallError(Exception):
    """Something the operator must fix; the message says what and how. Nothing was changed."""


# ---- the host -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """The node's filesystem as seen from here: host paths map to paths under root."""

    root: Path

    def path(self, host_path: PurePosixPath | str) -> Path:
        return self.root / str(host_path).lstrip("/")

    def resolve_link(self, host_path: PurePosixPath) -> list[PurePosixPath]:
        """The chain of names a host path's symlinks lead through (absolute targets stay on the host)."""
        chain = [host_path]
        for _ in range(16):
            local = self.path(chain[-1])
            if not local.is_symlink():
                break
            target = PurePosixPath(os.readlink(local))
            nxt = target if target.is_absolute() else PurePosixPath(os.path.normpath(chain[-1].parent / target))
            if nxt == chain[-1]:
                break
            chain.append(nxt)
        return chain


@dataclass(frozen=True)
class HostExec:
    """How to run a command on the node: directly, through nsenter into PID 1's mounts, or not at all."""

    mode: str  # "direct" | "nsenter" | "none"

    def argv(self, cmd: list[str]) -> list[str]:
        return ["nsenter", "--target", "1", "--mount", "--", *cmd] if self.mode == "nsenter" else cmd

    def run(self, cmd: list[str], *, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, timeout=timeout)


def pick_host_exec(requested: str, host: Host) -> HostExec:
    if requested == "auto":
        return HostExec("direct" if os.path.samefile(host.root, "/") else "none")
    if requested == "nsenter":
        try:
            same = os.readlink("/proc/1/ns/mnt") == os.readlink("/proc/self/ns/mnt")
        except OSError as e:
            raise InstallError(f"--host-exec nsenter: cannot read /proc/1/ns/mnt ({e}): the pod needs hostPID: true "
                               "and privileges") from None
        if same:
            raise InstallError("--host-exec nsenter: PID 1 here is not the node's init (same mount namespace as this "
                               "process): give the pod hostPID: true")
        if shutil.which("nsenter") is None:
            raise InstallError("--host-exec nsenter: no nsenter binary here (util-linux)")
    return HostExec(requested)


# ---- plan -----------------------------------------------------------------------------------------


@dataclass
class Change:
    """One change to the node: what it is in words (and a diff where it edits a file), and how to make it."""

    what: str
    apply: Callable[[], None]
    diff: str = ""


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    containerd_config_changed: bool = False
    hookd_changed: bool = False
    shimd_changed: bool = False
    config_after: bytes | None = None  # config.toml as the planned edit leaves it
    backups_made: list[str] = field(default_factory=list)  # the backups the planned edits make (node paths)
    version: PurePosixPath | None = None  # install: the venv directory the launchers use

    def add(self, what: str, apply: Callable[[], None], diff: str = "") -> None:
        self.changes.append(Change(what, apply, diff))


def _diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{name} (now)", f"{name} (new)"))


def _write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace path in one rename, keeping an existing file's mode and owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None else (st.st_mode & 0o7777 if st else 0o644))
        if st is not None:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _remove_dir(path: Path) -> None:
    """Remove a directory and all in it; one that is a mount point (a pod's hostPath) stays, empty."""
    for child in path.iterdir():
        _remove(child)
    try:
        path.rmdir()
    except OSError:
        if not os.path.ismount(path):
            raise


def _has_mark(path: Path, lines: int = 3) -> bool:
    try:
        with path.open("rb") as b:
            if b.read(4) == b"\x7fELF":  # the native shim client: the mark is compiled in (KYB_BUILD_ID)
                return MARK.encode() in b.read(4 << 20)
        with path.open("r", errors="replace") as f:
            head = [f.readline() for _ in range(lines)]
    except (FileNotFoundError, IsADirectoryError):
        return False
    return any(MARK in line for line in head)


def _plan_file(plan: Plan, host: Host, host_path: PurePosixPath, text: str, mode: int, *, what: str) -> bool:
    """Write a file this script owns (it carries MARK); refuse to replace one that does not. True: changes."""
    local = host.path(host_path)
    if local.is_symlink() or local.exists():
        if not _has_mark(local):
            raise InstallError(f"{host_path} exists and was not written by this installer: move it away "
                               "(or remove it) and run again")
        if local.read_text(errors="replace") == text and (local.stat().st_mode & 0o777) == mode:
            return False
        plan.add(f"replace {host_path} ({what})", lambda: _write_atomic(local, text.encode(), mode),
                 _diff(local.read_text(errors="replace"), text, str(host_path)))
        return True
    plan.add(f"write {host_path} ({what})", lambda: _write_atomic(local, text.encode(), mode))
    return True


# ---- the payload: wheels for the host's python ----------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # normalized (PEP 503)
    version: str
    tags: frozenset[Any]  # packaging.tags.Tag


def _packaging(wheels_dir: Path) -> Any:
    """The `packaging` library (PyPA's wheel tags, specifiers and markers), imported on first use.

    The installer image has it installed; a run straight from a checkout takes it from a packaging-*.whl in
    --wheels (a pure-Python wheel imports as a zip). Uninstalling never needs it.
    """
    try:
        import packaging.markers
        import packaging.requirements
        import packaging.specifiers
        import packaging.tags
        import packaging.utils
    except ImportError:
        found = sorted(wheels_dir.glob("packaging-*-py3-none-any.whl")) + sorted(
            wheels_dir.glob("*/packaging-*-py3-none-any.whl"))
        if not found:
            raise InstallError("install.py needs the `packaging` library: pip install packaging, or put its wheel "
                               f"(pip download packaging) into --wheels {wheels_dir}") from None
        sys.path.insert(0, str(found[-1]))
        import packaging.markers
        import packaging.requirements
        import packaging.specifiers
        import packaging.tags
        import packaging.utils
    return packaging


def _parse_wheel(path: Path, pk: Any) -> Wheel:
    try:
        name, version, _build, tags = pk.utils.parse_wheel_filename(path.name)
    except pk.utils.InvalidWheelFilename as e:
        raise InstallError(f"{path}: not a wheel file name (name-version[-build]-python-abi-platform.whl): "
                           f"{e}") from None
    return Wheel(path, str(name), str(version), frozenset(tags))


def _host_tags(pk: Any, minor: int, arch: str) -> frozenset[Any]:
    """Every wheel tag that runs on CPython 3.<minor> on glibc Linux on arch (musllinux does not).

    Any manylinux level is taken: the node's glibc is not known from here, and the image ships the
    manylinux2014/_2_28 wheels pip picked for it.
    """
    platforms = ([f"manylinux_2_{n}_{arch}" for n in range(60, 4, -1)]
                 + [f"manylinux{v}_{arch}" for v in ("2014", "2010", "1")] + [f"linux_{arch}"])
    version = (3, minor)
    return frozenset([*pk.tags.cpython_tags(version, abis=[f"cp3{minor}"], platforms=platforms),
                      *pk.tags.compatible_tags(version, interpreter=f"cp3{minor}", platforms=platforms)])


def _wheel_metadata(w: Wheel) -> email.message.Message:
    with zipfile.ZipFile(w.path) as z:
        names = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise InstallError(f"{w.path.name}: no single *.dist-info/METADATA inside: not a usable wheel")
        return email.parser.Parser().parsestr(z.read(names[0]).decode("utf-8", "replace"))


def _python_ok(spec: str, version: tuple[int, int], pk: Any = None) -> bool:
    """Requires-Python against the host's 3.<minor>, whose patch level is not known here: a spec that some
    3.<minor>.x satisfies passes (">=3.8,!=3.11.2" and "==3.*" do for 3.11; "!=3.11.*" does not)."""
    pk = pk or _packaging(Path("."))
    specifiers = pk.specifiers.SpecifierSet(spec)
    return any(specifiers.contains(f"{version[0]}.{version[1]}.{patch}", prereleases=True) for patch in range(100))


def _marker_environment(version: tuple[int, int], arch: str) -> dict[str, str]:
    """PEP 508 marker values of the node's interpreter: CPython 3.<minor> on Linux."""
    return {"python_version": f"{version[0]}.{version[1]}", "python_full_version": f"{version[0]}.{version[1]}.0",
            "implementation_name": "cpython", "implementation_version": f"{version[0]}.{version[1]}.0",
            "platform_python_implementation": "CPython", "os_name": "posix", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": arch, "platform_release": "", "platform_version": "",
            "extra": ""}


def select_wheels(wheels_dir: Path, version: tuple[int, int], arch: str,
                  extras: frozenset[str] = frozenset()) -> list[Wheel]:
    """kybernate's wheel (with the given extras of it) and everything it needs, for this python; a clear error
    for anything missing."""
    tag = f"cp{version[0]}{version[1]}"
    if not wheels_dir.is_dir():
        raise InstallError(f"--wheels {wheels_dir}: no such directory")
    candidates = sorted(wheels_dir.glob("*.whl"))
    if not candidates and (wheels_dir / tag).is_dir():
        candidates = sorted((wheels_dir / tag).glob("*.whl"))
    if not candidates:
        subdirs = sorted(p.name for p in wheels_dir.iterdir() if p.is_dir())
        have = f" (it has {', '.join(subdirs)})" if subdirs else ""
        raise InstallError(f"--wheels {wheels_dir}: no *.whl there nor in {tag}/{have}: the payload has no wheels "
                           f"for the host's Python {version[0]}.{version[1]}")
    pk = _packaging(wheels_dir)
    host_tags = _host_tags(pk, version[1], arch)
    environment = _marker_environment(version, arch)
    fitting: dict[str, list[Wheel]] = {}
    misfits: dict[str, list[str]] = {}
    for path in candidates:
        w = _parse_wheel(path, pk)
        if w.tags & host_tags:
            fitting.setdefault(w.name, []).append(w)
        else:
            misfits.setdefault(w.name, []).append(path.name)
    for name, ws in fitting.items():
        if len(ws) > 1:
            raise InstallError(f"--wheels: several wheels of {name} fit ({', '.join(w.path.name for w in ws)}): "
                               "keep one")
    chosen: dict[str, Wheel] = {}
    done: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements were followed
    todo: list[tuple[str, frozenset[str], str]] = [(RUNTIME_NAME, extras, "")]
    while todo:
        name, wanted, needed_by = todo.pop()
        if name not in fitting:
            why = (f"only {', '.join(misfits[name])}, which does not fit CPython {version[0]}.{version[1]} on {arch}"
                   if name in misfits else "none at all")
            by = f" (needed by {needed_by})" if needed_by else ""
            hint = "; or leave the extra out with --extras ''" if extras and needed_by.startswith(RUNTIME_NAME) else ""
            raise InstallError(f"--wheels {wheels_dir}: no wheel of {name}{by} for the host ({why}){hint}")
        w = chosen.setdefault(name, fitting[name][0])
        # Follow the distribution itself once (extra ""), and each extra of it that something asks for once.
        for extra in ("", *sorted(wanted)):
            if (name, extra) in done:
                continue
            done.add((name, extra))
            meta = _wheel_metadata(w)
            if not extra and not _python_ok(meta.get("Requires-Python", ""), version, pk):
                raise InstallError(f"{w.path.name} requires Python {meta['Requires-Python']}; the host has "
                                   f"{version[0]}.{version[1]}")
            provides = [str(pk.utils.canonicalize_name(e)) for e in meta.get_all("Provides-Extra") or []]
            if extra and extra not in provides:
                raise InstallError(f"{w.path.name} has no extra {extra!r} (it has: {', '.join(provides) or 'none'})")
            for line in meta.get_all("Requires-Dist") or []:
                req = pk.requirements.Requirement(line)
                # A marker decides for the node's interpreter and the extra being followed.
                if req.marker is None or req.marker.evaluate({**environment, "extra": extra}):
                    dep = str(pk.utils.canonicalize_name(req.name))
                    todo.append((dep, frozenset(str(pk.utils.canonicalize_name(e)) for e in req.extras),
                                 f"{name}[{extra}]" if extra else name))
    return [chosen[n] for n in sorted(chosen)]


def _payload_digest(wheels: list[Wheel], python: str) -> str:
    h = hashlib.sha256(python.encode())
    for w in wheels:
        h.update(w.path.name.encode())
        h.update(hashlib.sha256(w.path.read_bytes()).digest())
    return h.hexdigest()


def _console_scripts(w: Wheel) -> dict[str, str]:
    with zipfile.ZipFile(w.path) as z:
        names = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/entry_points\.txt", n)]
        if not names:
            return {}
        text = z.read(names[0]).decode()
    scripts: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]").strip()
        elif section == "console_scripts" and "=" in line:
            k, v = line.split("=", 1)
            scripts[k.strip()] = v.strip()
    return scripts


def _unpack_wheel(w: Wheel, venv: Path, site: Path, venv_python: str) -> None:
    """What pip does for a wheel, minus what a venv of ours does not need (no RECORD rewrite; bytecode is compiled
    for the whole venv afterwards, _compile_bytecode)."""
    with zipfile.ZipFile(w.path) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            rel = PurePosixPath(info.filename)
            if rel.is_absolute() or ".." in rel.parts:
                raise InstallError(f"{w.path.name}: unsafe path {info.filename!r} inside")
            data = z.read(info)
            if rel.parts[0].endswith(".data") and len(rel.parts) > 2:
                scheme, rest = rel.parts[1], PurePosixPath(*rel.parts[2:])
                if scheme in ("purelib", "platlib"):
                    dest = site / rest
                elif scheme == "scripts":
                    dest = venv / "bin" / rest
                    if data.startswith(b"#!python"):
                        data = b"#!" + venv_python.encode() + data[len(b"#!python"):]
                elif scheme == "data":
                    dest = venv / rest
                else:  # headers: nothing here compiles against them
                    continue
            else:
                dest = site / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            os.chmod(dest, 0o755 if (info.external_attr >> 16) & 0o111 else 0o644)
        for n in z.namelist():
            if re.fullmatch(r"[^/]+\.dist-info/METADATA", n):
                (site / PurePosixPath(n).parent / "INSTALLER").write_text(MARK + "\n")


def _compile_bytecode(host: Host, host_exec: HostExec, python: PurePosixPath, version: tuple[int, int],
                      new: PurePosixPath, final: PurePosixPath) -> None:
    """Compile the venv's modules once, with the node's own interpreter, so that no shim, hookd or CLI start
    compiles grpc's and protobuf's modules again (a node with PYTHONDONTWRITEBYTECODE would at every start;
    the GPU machine measured ~170 ms of a CLI start, docs/benchmarks.md). The code objects name the final
    directory, not the one being built. A failure costs speed, never the install: it is reported and passed."""
    if host_exec.mode == "none" and sys.version_info[:2] != version:
        print(f"note: bytecode not compiled: the node's Python {version[0]}.{version[1]} cannot be run from here "
              "(--host-exec); each module is compiled on its first import instead")
        return
    target = new if host_exec.mode == "nsenter" else host.path(new)
    interpreter = str(python) if host_exec.mode != "none" else sys.executable
    argv = [interpreter, "-m", "compileall", "-q", "-j", "0", "-s", str(target), "-p", str(final), str(target)]
    try:
        r = host_exec.run(argv, timeout=300) if host_exec.mode != "none" else subprocess.run(
            argv, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"note: bytecode not compiled ({e}); each module is compiled on its first import instead")
        return
    if r.returncode != 0:  # a wheel's file that does not compile (e.g. a test of another Python version)
        print(f"note: compileall reported failures (exit {r.returncode}): {(r.stdout + r.stderr).strip()[-300:]}")


def _build_venv(host: Host, venv: PurePosixPath, wheels: list[Wheel], python: PurePosixPath,
                version: tuple[int, int], record: dict[str, Any], host_exec: HostExec) -> None:
    """A fresh venv for one version, built beside its final name and renamed into place, so a broken build
    leaves nothing half-made under versions/; then `current` and the record point at it."""
    final = host.path(venv)
    new = final.with_name(final.name + ".new")
    old = final.with_name(final.name + ".old")
    for p in (new, old):
        _remove(p)
    venv_python = str(venv / "bin" / "python3")
    site = new / "lib" / f"python{version[0]}.{version[1]}" / "site-packages"
    site.mkdir(parents=True)
    (new / "bin").mkdir()
    os.symlink(str(python), new / "bin" / "python3")
    os.symlink("python3", new / "bin" / "python")
    os.symlink("python3", new / "bin" / f"python{version[0]}.{version[1]}")
    (new / "pyvenv.cfg").write_text(
        f"home = {python.parent}\ninclude-system-site-packages = false\n"
        f"version = {version[0]}.{version[1]}\nexecutable = {python}\n"
        f"# built by {MARK} from the wheels listed in {RECORD}\n")
    for w in wheels:
        _unpack_wheel(w, new, site, venv_python)
    _compile_bytecode(host, host_exec, python, version, venv.with_name(new.name), venv)
    if final.exists():  # the same version, rebuilt (its python changed): no shim can run from it then
        os.rename(final, old)
    os.rename(new, final)
    _remove(old)
    _point_current(host, venv)
    _write_atomic(host.path(RECORD), (json.dumps(record, indent=2) + "\n").encode(), 0o644)


def _use_version(host: Host, venv: PurePosixPath, record: dict[str, Any]) -> None:
    _point_current(host, venv)
    _write_atomic(host.path(RECORD), (json.dumps(record, indent=2) + "\n").encode(), 0o644)


def _point_current(host: Host, venv: PurePosixPath) -> None:
    """versions/<id> as `current`, replaced in one rename (a relative link: it reads the same in a pod)."""
    link = host.path(CURRENT)
    tmp = link.with_name(f".{link.name}.new")
    _remove(tmp)
    os.symlink(str(venv.relative_to(OPT)), tmp)
    os.replace(tmp, link)


# ---- the host's python ----------------------------------------------------------------------------


def find_host_python(host: Host, given: str | None, host_exec: HostExec) -> tuple[PurePosixPath, tuple[int, int]]:
    """The interpreter the venv will use (a host path, symlinks followed to the versioned name) and its version."""
    candidates = [given] if given else list(HOST_PYTHONS)
    found = [PurePosixPath(c) for c in candidates if os.path.lexists(host.path(c))]
    if not found:
        where = given or " or ".join(HOST_PYTHONS)
        raise InstallError(f"no python3 on the node at {where}: install python3 (3.11 or newer) there first"
                           + ("" if given else ", or name it with --python"))
    chain = host.resolve_link(found[0])
    for name in reversed(chain):
        m = re.fullmatch(r"python(\d+)\.(\d+)", name.name)
        if m:
            python, version = name, (int(m.group(1)), int(m.group(2)))
            break
    else:
        if host_exec.mode == "none":
            raise InstallError(f"cannot tell the version of {found[0]} from its name: name the interpreter with its "
                               "version, e.g. --python /usr/bin/python3.11")
        r = host_exec.run([str(chain[-1]), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], timeout=30)
        if r.returncode != 0:
            raise InstallError(f"{chain[-1]} did not run: {r.stderr.strip()}")
        major, minor = (int(x) for x in r.stdout.strip().split("."))
        python, version = chain[-1], (major, minor)
    if not os.path.lexists(host.path(python)):
        raise InstallError(f"{found[0]} leads to {python}, which does not exist on the node")
    if version < MIN_HOST_PYTHON:
        newer = sorted(p.name for p in host.path("/usr/bin").glob("python3.*")
                       if re.fullmatch(r"python3\.(\d+)", p.name) and int(p.name.split(".")[1]) >= MIN_HOST_PYTHON[1])
        hint = f"; this node has {', '.join('/usr/bin/' + n for n in newer)}: pass --python with one" if newer else (
            ": install python3.11 or newer and pass --python /usr/bin/python3.X")
        raise InstallError(f"the node's {python} is Python {version[0]}.{version[1]}; Kybernate needs "
                           f"{MIN_HOST_PYTHON[0]}.{MIN_HOST_PYTHON[1]} or newer{hint}")
    return python, version


# ---- containerd's config --------------------------------------------------------------------------


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _toml(text: str, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InstallError(f"{what} is not valid TOML ({e}): fix it first") from None


def _snippet_tables(source: Path, version: int) -> str:
    """The runtime entry from containerd-config/, from its first table on (its header talks to humans)."""
    path = source / SNIPPETS[version]
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InstallError(f"{path} not found: run the installer from a Kybernate checkout or payload, "
                           "or point --source at one") from None
    lines = text.splitlines(True)
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
    body = "".join(lines[start:])
    parsed = _toml(body, str(path))
    entry = _dig(parsed, "plugins", CRI_RUNTIME_PLUGIN[version], "containerd", "runtimes", RUNTIME_NAME)
    if not entry or entry.get("runtime_type") != RUNTIME_TYPES[version]:
        raise InstallError(f"{path} does not define runtimes.{RUNTIME_NAME} with runtime_type {RUNTIME_TYPES[version]}")
    return body


def _array_span(text: str, start: int) -> tuple[int, list[tuple[int, int, str]]]:
    """From the '[' at start: the index just past the matching ']', and the string elements (start, end, value)."""
    i, depth, items = start, 0, []
    while i < len(text):
        c = text[i]
        if c == "#":
            i = text.find("\n", i)
            if i < 0:
                break
            continue
        if c in "\"'":
            triple = text.startswith(c * 3, i)
            q = c * 3 if triple else c
            j = i + len(q)
            while j < len(text) and not text.startswith(q, j):
                j += 2 if (c == '"' and text[j] == "\\") else 1
            end = j + len(q)
            if depth == 1 and not triple:
                raw = text[i:end]
                items.append((i, end, tomllib.loads(f"v = {raw}")["v"]))
            i = end
            continue
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return i + 1, items
        i += 1
    raise ValueError("unterminated array")


_IMPORTS_RE = re.compile(r"(?m)^[ \t]*imports[ \t]*=[ \t]*(?=\[)")
_VERSION_RE = re.compile(r"(?m)^[ \t]*version[ \t]*=[ \t]*3[ \t]*(?:#[^\n]*)?$")


def _add_import(text: str, entry: str) -> str | None:
    """config.toml with entry appended to its top-level imports; None when the text is too unusual to edit."""
    literal = json.dumps(entry)
    m = _IMPORTS_RE.search(text)
    if not m:
        v = _VERSION_RE.search(text)
        return None if v is None else text[:v.end()] + f"\nimports = [{literal}]" + text[v.end():]
    try:
        end, items = _array_span(text, m.end())
    except ValueError:
        return None
    close = end - 1
    if not items:
        return text[:close] + literal + text[close:]
    last_end = items[-1][1]
    line_end = text.find("\n", last_end, close)
    if line_end >= 0:  # one element per line: a new line after the last one, same indent
        indent = re.search(r"([ \t]*)$", text[:items[-1][0]])
        pad = indent.group(1) if indent else "  "
        rest = text[last_end:line_end].split("#", 1)[0]
        if "," in rest:
            return text[:line_end] + f"\n{pad}{literal}," + text[line_end:]
        return text[:last_end] + "," + text[last_end:line_end] + f"\n{pad}{literal}" + text[line_end:]
    comma = text.find(",", last_end, close)
    if comma >= 0:
        return text[:comma + 1] + " " + literal + text[comma + 1:]
    return text[:last_end] + ", " + literal + text[last_end:]


def _drop_import(text: str, entry: str) -> str | None:
    """config.toml without entry in its top-level imports; None when it is not there as a plain string."""
    m = _IMPORTS_RE.search(text)
    if not m:
        return None
    try:
        _, items = _array_span(text, m.end())
    except ValueError:
        return None
    for k, (s, e, value) in enumerate(items):
        if value != entry:
            continue
        after = re.match(r"[ \t]*,[ \t]*", text[e:])
        if after:
            e += after.end()
        elif k > 0:  # the last element: the comma before it goes
            s = text.rindex(",", items[k - 1][1], s)
        line_start = text.rfind("\n", 0, s) + 1
        line_end = text.find("\n", e)
        if not text[line_start:s].strip() and line_end >= 0 and not text[e:line_end].strip():
            s, e = line_start, line_end + 1  # it stood alone on its line: the line goes
        return text[:s] + text[e:]
    return None


def _imports_cover(patterns: list[str], config_dir: PurePosixPath, target: PurePosixPath) -> str | None:
    for p in patterns:
        full = PurePosixPath(p) if PurePosixPath(p).is_absolute() else config_dir / p
        if full == target or (any(ch in p for ch in "*?[") and target.match(str(full))):
            return p
    return None


def _backup_name(host: Host, config: PurePosixPath) -> PurePosixPath:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = config.with_name(f"{config.name}.kybernate-backup-{stamp}")
    n = 1
    while os.path.lexists(host.path(name)):
        n += 1
        name = config.with_name(f"{config.name}.kybernate-backup-{stamp}-{n}")
    return name


def _plan_config_edit(plan: Plan, host: Host, config: PurePosixPath, old: str, new: str, why: str) -> None:
    local = host.path(config)
    backup = _backup_name(host, config)

    def back_up() -> None:
        shutil.copy2(local, host.path(backup))
    plan.add(f"back up {config} to {backup}", back_up)
    plan.add(f"edit {config}: {why}", lambda: _write_atomic(local, new.encode()), _diff(old, new, str(config)))
    plan.containerd_config_changed = True
    plan.config_after = new.encode()
    plan.backups_made.append(str(backup))


def plan_containerd(plan: Plan, host: Host, config: PurePosixPath, source: Path | None, uninstall: bool) -> None:
    local = host.path(config)
    dropin = config.parent / "conf.d" / f"{RUNTIME_NAME}.toml"
    local_dropin = host.path(dropin)
    try:
        text = local.read_text()
    except FileNotFoundError:
        if uninstall:
            plan.notes.append(f"{config} does not exist: nothing to take out of it")
            text = None
        else:
            raise InstallError(
                f"{config} does not exist (containerd runs on built-in defaults). Generate it first: "
                f"`containerd config default > {config}`, review it, restart containerd, then run this again"
            ) from None
    except OSError as e:
        raise InstallError(f"cannot read {config}: {e}") from None
    if uninstall:
        if text is not None:
            _plan_containerd_uninstall(plan, host, config, text, dropin)
        if local_dropin.exists():
            if _has_mark(local_dropin):
                plan.add(f"remove {dropin}", lambda: local_dropin.unlink())
                plan.containerd_config_changed = True
            else:
                plan.notes.append(f"left {dropin}: not written by this installer")
        return

    assert text is not None and source is not None
    parsed = _toml(text, str(config))
    version = parsed.get("version")
    if version not in (2, 3):
        shown = "no `version` key (containerd reads that as version 1)" if version is None else f"version = {version!r}"
        raise InstallError(
            f"{config} has {shown}; this installer knows config version 2 (containerd 1.6/1.7) and 3 "
            f"(containerd 2.x). Regenerate the file with `containerd config default` of the installed containerd "
            f"(or `containerd config migrate`), or add containerd-config/config-v*-kybernate.toml by hand")
    imports = parsed.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise InstallError(f"{config}: `imports` is not a list of paths")
    cri = CRI_RUNTIME_PLUGIN[version]
    tables = _snippet_tables(source, version)

    if version == 2:
        blocks = _BLOCK_RE.findall(text)
        if len(blocks) > 1:
            raise InstallError(f"{config} has {len(blocks)} kybernate blocks: keep at most one (or none) and run again")
        # The operator's text stays byte for byte (trailing blank lines too), so an uninstall gives it back.
        base = _BLOCK_RE.sub("", text)
        if blocks and base.endswith("\n\n"):  # the blank line an earlier install put before its block
            base = base[:-1]
        if not base.endswith("\n"):
            base += "\n"
        base_parsed = _toml(base, str(config))
        if _dig(base_parsed, "plugins", cri, "containerd", "runtimes", RUNTIME_NAME) is not None:
            plan.notes.append(f"{config} already registers runtimes.{RUNTIME_NAME} outside this installer's block: "
                              "left as it is")
            return
        _refuse_cri_imports(host, config, imports, cri)
        block = f"{BLOCK_BEGIN}\n# (from {SNIPPETS[2]})\n{tables.rstrip()}\n{BLOCK_END}\n"
        new = base + "\n" + block
        try:
            ok = tomllib.loads(new) == _merge(base_parsed, tomllib.loads(tables))
        except tomllib.TOMLDecodeError:
            ok = False
        if not ok:
            raise InstallError(f"{config}: appending the runtime entry would not give the intended config (the file "
                               f"defines those tables in a way that cannot be extended): add {SNIPPETS[2]} by hand")
        if new != text:
            why = "replace the kybernate block" if blocks else "append the kybernate runtime block"
            _plan_config_edit(plan, host, config, text, new, why)
        return

    # version 3: a drop-in, and an imports entry unless one already covers it.
    if _dig(parsed, "plugins", cri, "containerd", "runtimes", RUNTIME_NAME) is not None:
        plan.notes.append(f"{config} already registers runtimes.{RUNTIME_NAME} itself: left as it is, no drop-in")
        return
    dropin_text = (f"# Written by {MARK} from {SNIPPETS[3]}; `install.py --uninstall` removes it.\n"
                   "# Runtime settings live in /etc/kybernate/runtime.toml, not here.\n"
                   f"version = 3\n\n{tables}")
    if _plan_file(plan, host, dropin, dropin_text, 0o644, what="containerd drop-in with the kybernate runtime"):
        plan.containerd_config_changed = True
    covered = _imports_cover(imports, config.parent, dropin)
    if covered == str(dropin):
        plan.notes.append(f"{config} already imports {dropin}")
        return
    if covered:
        plan.notes.append(f"{config}: imports already covers {dropin} ({covered!r})")
        return
    edited = _add_import(text, str(dropin))
    expected = dict(parsed, imports=[*imports, str(dropin)])
    try:
        ok = edited is not None and tomllib.loads(edited) == expected
    except tomllib.TOMLDecodeError:
        ok = False
    if not ok or edited is None:
        raise InstallError(f"{config}: could not add {str(dropin)!r} to `imports` safely: add it by hand "
                           f"(imports = [..., \"{dropin}\"]) and run again")
    _plan_config_edit(plan, host, config, text, edited, f"add {dropin} to imports")


def _refuse_cri_imports(host: Host, config: PurePosixPath, imports: list[str], cri: str) -> None:
    """containerd 1.x: an imported file's CRI section would replace the one the block extends."""
    for pattern in imports:
        full = PurePosixPath(pattern) if PurePosixPath(pattern).is_absolute() else config.parent / pattern
        for match in sorted(glob.glob(str(host.path(full)))):
            try:
                data = tomllib.loads(Path(match).read_text())
            except (OSError, tomllib.TOMLDecodeError):
                continue
            if _dig(data, "plugins", cri) is not None:
                shown = "/" + str(Path(match).relative_to(host.root))
                raise InstallError(
                    f"{shown} (imported by {config}) has a [plugins.\"{cri}\"] section; containerd 1.6/1.7 replace "
                    f"the whole CRI section with an imported one, so an entry in {config.name} would be lost. "
                    f"Add {SNIPPETS[2]} to {shown} by hand instead")


def _plan_containerd_uninstall(plan: Plan, host: Host, config: PurePosixPath, text: str,
                               dropin: PurePosixPath) -> None:
    new = text
    whys = []
    if _BLOCK_RE.search(new):
        new = _BLOCK_RE.sub("", new)
        if new.endswith("\n\n"):  # the blank line the install put before the block
            new = new[:-1]
        whys.append("remove the kybernate runtime block")
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        parsed = {}
    if str(dropin) in (parsed.get("imports") or []):
        dropped = _drop_import(new, str(dropin))
        expected = [i for i in parsed["imports"] if i != str(dropin)]
        try:
            ok = dropped is not None and tomllib.loads(dropped).get("imports", []) == expected
        except tomllib.TOMLDecodeError:
            ok = False
        if not ok or dropped is None:
            raise InstallError(f"{config}: could not take {str(dropin)!r} out of `imports` safely: remove it by hand")
        new = dropped
        whys.append(f"remove {dropin} from imports")
    if new != text:
        _toml(new, f"{config} after the edit")
        _plan_config_edit(plan, host, config, text, new, ", ".join(whys))


# ---- versions: one venv per payload, old ones removed once no process uses them ---------------------


def version_dir(kybernate_version: str, payload_sha256: str) -> PurePosixPath:
    """The venv of one payload: kybernate's version for people, the payload digest for exactness (the same
    version with other dependency wheels or another python is another directory)."""
    return VERSIONS / f"{kybernate_version}-{payload_sha256[:12]}"


def _extras(args: argparse.Namespace) -> frozenset[str]:
    return frozenset(e.strip().lower() for e in (args.extras or "").split(",") if e.strip())


def _process_paths(pid: str) -> list[str]:
    """The paths a process names: its command line's words and the files it maps (as the node sees them)."""
    out: list[str] = []
    try:
        out += [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        with open(f"/proc/{pid}/maps", errors="replace") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6:
                    out.append(fields[5].rstrip("\n"))
    except OSError:  # gone meanwhile, or a kernel thread
        pass
    return out


def node_processes(host: Host) -> list[int]:
    """The processes that run on this node's filesystem: those whose own /opt/kybernate (seen through
    /proc/<pid>/root) is the node's. A pod's processes, or another node's on a shared machine, are not;
    without the node's PID namespace (hostPID) there are none."""
    try:
        node = os.stat(host.path(OPT))
    except OSError:
        return []
    me, pids = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/root{OPT}")
        except OSError:  # gone, a kernel thread, no /opt/kybernate in its view, or not ours to look at
            continue
        if (st.st_dev, st.st_ino) == (node.st_dev, node.st_ino):
            pids.append(int(entry.name))
    return pids


def processes_using(host: Host, dirs: list[PurePosixPath], pids: list[int]) -> dict[PurePosixPath, list[int]]:
    """Per directory, which of pids have a command line word or a mapped file in it (a node path, as the
    node's processes see it; or the path it has here, for a run on the node with another --host-root)."""
    prefixes = {d: (str(d) + "/", str(host.path(d)) + "/") for d in dirs}
    users: dict[PurePosixPath, list[int]] = {d: [] for d in dirs}
    for pid in pids:
        paths = _process_paths(str(pid))
        for d, (node_prefix, local_prefix) in prefixes.items():
            if any(p.startswith(node_prefix) or p.startswith(local_prefix) for p in paths):
                users[d].append(pid)
    return users


def old_versions(host: Host, keep: PurePosixPath | None) -> list[PurePosixPath]:
    """Every venv directory under versions/ but keep, and the single venv of older installers."""
    found = [VERSIONS / p.name for p in sorted(host.path(VERSIONS).iterdir())] if host.path(VERSIONS).is_dir() else []
    if os.path.lexists(host.path(LEGACY_VENV)):
        found.append(LEGACY_VENV)
    return [d for d in found if d != keep]


def prune_versions(host: Host, keep: PurePosixPath | None, *, dry_run: bool) -> None:
    """Remove the old versions no process of the node uses; keep (and say why) the rest.

    A running kybernate shim of the node that names no version directory at all (an unusual launcher) could
    be using any of them: then all are kept. Without a view of the node's processes all are kept too.
    """
    old = old_versions(host, keep)
    if not old:
        return
    pids = node_processes(host)
    if not pids:
        print(f"note: kept {len(old)} earlier version(s) under {VERSIONS}: this run cannot see the node's "
              "processes (run on the node, or in a pod with hostPID); a later such run removes those no "
              "process uses")
        return
    users = processes_using(host, [*old, *([keep] if keep else [])], pids)
    known = {pid for ps in users.values() for pid in ps}
    launcher = str(BIN_DIR / LAUNCHERS[0])
    shims = _kybernate_shims()
    unknown = [pid for pid in pids if pid in shims and launcher in shims[pid][:2] and pid not in known]
    if unknown:
        print(f"note: kept every earlier version under {VERSIONS}: kybernate shim(s) {unknown} name no version "
              "directory, so which one they use is unknown")
        return
    for d in old:
        if users[d]:
            print(f"note: kept {d}: still in use by pid(s) {', '.join(map(str, users[d]))} (the next run after "
                  "they exit removes it)")
        else:
            print(f"{'would remove' if dry_run else 'remove'} {d} (an earlier version no process uses)")
            if not dry_run:
                _remove(host.path(d))
    if not dry_run and host.path(VERSIONS).is_dir() and not any(host.path(VERSIONS).iterdir()):
        host.path(VERSIONS).rmdir()


# ---- the install manifest: what the installs created, so that the uninstall removes exactly that --------


@dataclass
class Manifest:
    """Node paths the installs created (parents before children), the digest of each file an operator may
    edit as the install wrote it, and the config backups they made (oldest first: the first holds
    config.toml as it was before any install)."""

    created: list[str] = field(default_factory=list)
    written: dict[str, str] = field(default_factory=dict)
    backups: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, host: Host) -> Manifest | None:
        try:
            data = json.loads(host.path(MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise InstallError(f"{MANIFEST} is unreadable ({e}): restore it or remove it (then the uninstall "
                               "removes only the files marked as the installer's, and keeps runtime.toml, "
                               "directories and backups)") from None
        return cls(list(data.get("created", [])), dict(data.get("written", {})), list(data.get("backups", [])))

    def save(self, host: Host) -> None:
        data = {"installer": MARK, "created": self.created, "written": self.written, "backups": self.backups}
        _write_atomic(host.path(MANIFEST), (json.dumps(data, indent=2) + "\n").encode(), 0o644)


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def created_candidates(config: PurePosixPath) -> list[PurePosixPath]:
    """Every node path an install may create outside /opt/kybernate's contents, with their parents."""
    paths = [config.parent / "conf.d" / f"{RUNTIME_NAME}.toml", *(BIN_DIR / n for n in LAUNCHERS), SHIM_PY,
             RUNTIME_TOML, UNIT, UNIT_WANTS, SHIMD_UNIT, SHIMD_UNIT_WANTS, OPT]
    out: list[PurePosixPath] = []
    for p in paths:
        for q in [*reversed(p.parents[:-1]), p]:  # parents first, the root itself never
            if q not in out:
                out.append(q)
    return out


class CreationLog:
    """What exists before an install's changes; afterwards, what they created goes into the manifest."""

    def __init__(self, host: Host, config: PurePosixPath) -> None:
        self.host, self.config = host, config
        self.candidates = created_candidates(config)
        self.existed = {p for p in self.candidates if os.path.lexists(host.path(p))}
        self.backups_before = set(self._backups())

    def _backups(self) -> list[str]:
        pattern = str(self.host.path(self.config)) + ".kybernate-backup-*"
        return sorted(str(self.config.parent / Path(p).name) for p in glob.glob(pattern))

    def record(self) -> None:
        """Add what this run created to the manifest (also after a failed run: what it made stays known)."""
        created = [p for p in self.candidates if p not in self.existed and os.path.lexists(self.host.path(p))]
        backups = [b for b in self._backups() if b not in self.backups_before]
        if not created and not backups:
            return
        self.host.path(OPT).mkdir(parents=True, exist_ok=True)  # where the manifest lives, even after a failure
        created = [p for p in self.candidates if p not in self.existed and os.path.lexists(self.host.path(p))]
        manifest = Manifest.load(self.host) or Manifest()
        for p in created:
            if str(p) not in manifest.created:
                manifest.created.append(str(p))
            if p == RUNTIME_TOML:
                manifest.written[str(p)] = _sha256_file(self.host.path(p))
        manifest.backups += [b for b in backups if b not in manifest.backups]
        manifest.save(self.host)


def plan_uninstall_created(plan: Plan, host: Host, config: PurePosixPath, manifest: Manifest | None) -> None:
    """runtime.toml, the config backups and the directories the installs created, per the manifest."""
    runtime = host.path(RUNTIME_TOML)
    if manifest is None:
        if os.path.lexists(host.path(OPT)):
            plan.notes.append(f"no {MANIFEST} (installed by an older installer): kept {RUNTIME_TOML}, any "
                              f"{config}.kybernate-backup-* files and the directories the install made")
        return
    if os.path.lexists(runtime):
        wrote = manifest.written.get(str(RUNTIME_TOML))
        if str(RUNTIME_TOML) not in manifest.created or wrote is None:
            plan.notes.append(f"kept {RUNTIME_TOML}: it was there before the install")
        elif runtime.is_file() and _sha256_file(runtime) == wrote:
            plan.add(f"remove {RUNTIME_TOML} (as the install wrote it)", runtime.unlink)
        else:
            plan.notes.append(f"kept {RUNTIME_TOML}: changed since the install wrote it (the operator's settings); "
                              "remove it by hand if they are not needed any more")
    if manifest.backups:
        first = host.path(manifest.backups[0])
        final = plan.config_after if plan.config_after is not None else _read_or_none(host.path(config))
        names = [*manifest.backups, *plan.backups_made]
        if final is not None and first.is_file() and first.read_bytes() == final:
            def remove_backups() -> None:
                for b in names:
                    host.path(b).unlink(missing_ok=True)
            plan.add(f"remove the config backups {', '.join(names)} ({config} is byte for byte as before the "
                     "install)", remove_backups)
        else:
            plan.notes.append(f"kept the config backups {', '.join(manifest.backups)}: {config} differs from the one "
                              "before the install (changed since), so they may still be needed")
    dirs = [PurePosixPath(p) for p in manifest.created if PurePosixPath(p) != OPT and not p.startswith(str(OPT) + "/")]
    dirs = sorted({d for d in dirs if host.path(d).is_dir() and not host.path(d).is_symlink()},
                  key=lambda d: len(d.parts), reverse=True)
    if dirs:
        def remove_dirs() -> None:
            for d in dirs:
                local = host.path(d)
                if local.is_dir() and not any(local.iterdir()):
                    local.rmdir()
                elif local.is_dir():
                    print(f"  kept {d}: not empty ({', '.join(sorted(c.name for c in local.iterdir())[:5])})")
        plan.add("remove the directories the install created, where empty: " + ", ".join(map(str, dirs)), remove_dirs)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# ---- install / uninstall --------------------------------------------------------------------------


def _launcher(name: str, call: str, venv: PurePosixPath) -> str:
    """A console-script launcher on one version's python: a shim started by it imports that version's code
    only, whatever is installed later (the interpreter's sys.prefix is the versioned directory)."""
    m = _LAUNCHER_CALL.match(call)
    if not m:
        raise InstallError(f"kybernate wheel: console script {name} = {call!r} is not module:function")
    module, attr = m.groups()
    return (f"#!{venv}/bin/python3\n"
            f"# {name}: written by {MARK}; `install.py --uninstall` removes it.\n"
            "import sys\n"
            f"from {module} import {attr.split('.')[0]}\n"
            f"sys.exit({attr}())\n")


def plan_install(plan: Plan, host: Host, args: argparse.Namespace, host_exec: HostExec) -> None:
    source = args.source
    config = PurePosixPath(args.containerd_config)
    # Everything that can refuse comes first: nothing is planned to change before all checks passed.
    python, version = find_host_python(host, args.python, host_exec)
    wheels = select_wheels(args.wheels, version, os.uname().machine, extras=_extras(args))
    plan_containerd(plan, host, config, source, uninstall=False)
    unit_src = source / UNIT_SOURCE
    runtime_src = source / RUNTIME_TOML_SOURCE
    for p in (unit_src, runtime_src, source / SHIMD_UNIT_SOURCE):
        if not p.is_file():
            raise InstallError(f"{p} not found: run the installer from a Kybernate checkout or payload (--source)")
    kyb = next(w for w in wheels if w.name == RUNTIME_NAME)
    scripts = _console_scripts(kyb)
    missing = [n for n in LAUNCHERS if n not in scripts]
    if missing:
        raise InstallError(f"{kyb.path.name} has no console script {', '.join(missing)}: wrong wheel?")

    # The venv of this payload: its own directory under versions/, built when missing (or its python changed).
    digest = _payload_digest(wheels, str(python))
    venv = plan.version = version_dir(kyb.version, digest)
    launchers = {n: _launcher(n, scripts[n], venv) for n in LAUNCHERS}
    record = {"payload_sha256": digest, "python": str(python), "python_version": f"{version[0]}.{version[1]}",
              "version": kyb.version, "venv": str(venv), "extras": sorted(_extras(args)),
              "wheels": [w.path.name for w in wheels], "installer": MARK}
    try:
        current = json.loads(host.path(RECORD).read_text())
    except (OSError, ValueError):
        current = {}
    link = host.path(venv / "bin" / "python3")
    # A version directory only ever appears complete (built aside, renamed into place), and its name carries
    # the payload's digest: one that is there is this payload's venv, possibly with shims still running from
    # it (a rollback to a version that was kept): reused as it is, never rebuilt under them.
    built = host.path(venv / "pyvenv.cfg").is_file() and link.is_symlink() and os.readlink(link) == str(python)
    recorded = current.get("payload_sha256") == digest and current.get("venv") == str(venv)
    if not built:
        verb = "rebuild" if host.path(venv).exists() else "create"
        plan.add(f"{verb} {venv} for {python} (Python {version[0]}.{version[1]}) from {len(wheels)} wheels: "
                 + ", ".join(w.path.name for w in wheels),
                 lambda: _build_venv(host, venv, wheels, python, version, record, host_exec))
        plan.hookd_changed = plan.shimd_changed = True
    elif not recorded:
        plan.add(f"switch back to {venv} (kept from an earlier install: reused as it is)",
                 lambda: _use_version(host, venv, record))
        plan.hookd_changed = plan.shimd_changed = True
    self_text = Path(__file__).read_text()
    if not host.path(SELF_COPY).is_file() or host.path(SELF_COPY).read_text() != self_text:
        plan.add(f"write {SELF_COPY} (this installer, for --uninstall)",
                 lambda: _write_atomic(host.path(SELF_COPY), self_text.encode(), 0o755))
    # The shim's Python launcher first: the native client falls back to it, so it is there before the client.
    _plan_file(plan, host, SHIM_PY, launchers[LAUNCHERS[0]], 0o755, what=f"the shim's Python launcher for {venv}")
    for name, text in launchers.items():
        if name == LAUNCHERS[0]:
            _plan_shim_binary(plan, host, host_exec, venv, version, kyb, text)
            _plan_passlane(plan, host, host_exec, venv, version, kyb)
        elif _plan_file(plan, host, BIN_DIR / name, text, 0o755, what=f"launcher for {venv}"):
            plan.hookd_changed |= name == LAUNCHERS[1]
            plan.shimd_changed |= name == LAUNCHERS[2]

    if os.path.lexists(host.path(RUNTIME_TOML)):
        plan.notes.append(f"kept {RUNTIME_TOML} (exists; never overwritten)")
    else:
        text = runtime_src.read_text()
        plan.add(f"write {RUNTIME_TOML} (defaults from {RUNTIME_TOML_SOURCE})",
                 lambda: _write_atomic(host.path(RUNTIME_TOML), text.encode(), 0o644))

    unit_text = (f"# Installed by {MARK} from {UNIT_SOURCE}; the installer replaces this file.\n"
                 "# Customise with a drop-in (`systemctl edit kybernate-hookd`), not here.\n"
                 + (source / UNIT_SOURCE).read_text())
    if _plan_file(plan, host, UNIT, unit_text, 0o644, what="systemd unit of kybernate-hookd"):
        plan.hookd_changed = True
    _plan_unit_enabled(plan, host, "kybernate-hookd", UNIT, UNIT_WANTS)
    _plan_shimd_unit(plan, host, source)


def _plan_unit_enabled(plan: Plan, host: Host, name: str, unit: PurePosixPath, wants_link: PurePosixPath) -> None:
    """The unit enabled as `systemctl enable` would: its link in the wants directory (never over another file)."""
    wants = host.path(wants_link)
    if not (wants.is_symlink() and os.readlink(wants) == str(unit)):
        if os.path.lexists(wants):
            raise InstallError(f"{wants_link} exists but is not a link to {unit}: remove it and run again")

        def enable() -> None:
            wants.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(str(unit), wants)
        plan.add(f"enable {name}: link {wants_link} -> {unit}", enable)


def _plan_shimd_unit(plan: Plan, host: Host, source: Path) -> None:
    """kybernate-shimd's unit, enabled: new pods start through it (shim/resident.py); running pods never need it."""
    text = (f"# Installed by {MARK} from {SHIMD_UNIT_SOURCE}; the installer replaces this file.\n"
            "# Customise with a drop-in (`systemctl edit kybernate-shimd`), not here.\n"
            + (source / SHIMD_UNIT_SOURCE).read_text())
    if not re.search(r"(?m)^KillMode=process\s*$", text):
        # Without it, stopping or restarting the service would kill every pod's shim daemon forked from it.
        raise InstallError(f"{source / SHIMD_UNIT_SOURCE} lacks KillMode=process: a broken payload, use another")
    if _plan_file(plan, host, SHIMD_UNIT, text, 0o644, what="systemd unit of kybernate-shimd"):
        plan.shimd_changed = True
    _plan_unit_enabled(plan, host, "kybernate-shimd", SHIMD_UNIT, SHIMD_UNIT_WANTS)


def _host_cc(host: Host, host_exec: HostExec) -> str | None:
    """The node's C compiler as the installer can run it, or None (as `make venv`: `command -v cc`)."""
    if host_exec.mode == "direct":
        return shutil.which("cc")
    if host_exec.mode == "nsenter":
        return next((c for c in ("/usr/bin/cc", "/usr/local/bin/cc") if os.path.exists(host.path(c))), None)
    return None  # no way to run a program on the node


def _compile(host: Host, host_exec: HostExec, cc: str, flags: list[str], src: PurePosixPath,
             out: PurePosixPath) -> subprocess.CompletedProcess[str]:
    """The node's cc on the version's `src` into `out` (both node paths). nsenter runs cc in the node's mount
    namespace (node paths); direct runs it here (the same paths under the host root)."""
    out_arg, src_arg = (out, src) if host_exec.mode == "nsenter" else (host.path(out), host.path(src))
    return host_exec.run([cc, "-O2", *flags, "-o", str(out_arg), str(src_arg)], timeout=120)


def _native_build_id(source: bytes) -> str:
    return f"{MARK} native client {hashlib.sha256(source).hexdigest()[:16]}"


def _plan_shim_binary(plan: Plan, host: Host, host_exec: HostExec, venv: PurePosixPath, version: tuple[int, int],
                      kyb: Wheel, launcher: str) -> None:
    """containerd-shim-kybernate-v1: the native client built with the node's cc where there is one (from this
    version's source; the source's digest is compiled in beside MARK, so an unchanged one is not rebuilt), else
    the Python launcher, as `make venv` decides. A failed build leaves the Python launcher there."""
    binary = BIN_DIR / LAUNCHERS[0]
    local = host.path(binary)
    with zipfile.ZipFile(kyb.path) as z:
        try:
            source: bytes | None = z.read(NATIVE_SOURCE)
        except KeyError:
            source = None  # a wheel from before the native client
    if source is not None and os.path.exists(local) and _has_mark(local):
        with local.open("rb") as f:
            if f.read(4) == b"\x7fELF" and _native_build_id(source).encode() in f.read(4 << 20):
                return  # built from this very source: nothing to do
    cc = _host_cc(host, host_exec) if source is not None else None
    if cc is None or source is None:
        if source is not None:
            plan.notes.append(f"no C compiler the installer can run on the node (cc, --host-exec): {binary} is the "
                              "Python launcher (pods start slower: docs/benchmarks.md)")
        if _plan_file(plan, host, binary, launcher, 0o755, what=f"launcher for {venv}"):
            plan.shimd_changed = True
        return
    if os.path.lexists(local) and not _has_mark(local):
        raise InstallError(f"{binary} exists and was not written by this installer: move it away (or remove it) "
                           "and run again")
    src = venv / "lib" / f"python{version[0]}.{version[1]}" / "site-packages" / NATIVE_SOURCE
    new = BIN_DIR / f".{LAUNCHERS[0]}.new"
    build_id = _native_build_id(source)

    def build() -> None:
        # Static where the node's C library allows it (libc.a): no dynamic loader on each of containerd's execs.
        for link in (["-static"], []):
            r = _compile(host, host_exec, cc, [*link, f'-DKYB_BUILD_ID="{build_id}"'], src, new)
            if r.returncode == 0:
                break
        if r.returncode != 0:
            host.path(new).unlink(missing_ok=True)
            _write_atomic(local, launcher.encode(), 0o755)  # slower pod starts, nothing broken
            print(f"note: building the native shim client failed ({r.stderr.strip()[-400:]}); {binary} is the "
                  "Python launcher")
            return
        os.chmod(host.path(new), 0o755)
        os.replace(host.path(new), local)
    plan.add(f"build {binary} (the native shim client) from {src} with the node's {cc}", build)
    plan.shimd_changed = True


def _plan_passlane(plan: Plan, host: Host, host_exec: HostExec, venv: PurePosixPath, version: tuple[int, int],
                   kyb: Wheel) -> None:
    """The pass lane in the version's venv, built with the node's cc (its source's digest compiled in, so an
    unchanged one is not rebuilt). Without a compiler, or if it does not build, pod daemons pass every call
    through Python: slower proxied calls, nothing broken."""
    with zipfile.ZipFile(kyb.path) as z:
        try:
            source = z.read(PASSLANE_SOURCE)
        except KeyError:
            return  # a wheel from before the pass lane
    library = venv / PASSLANE_LIBRARY
    build_id = f"{MARK} pass lane {hashlib.sha256(source).hexdigest()[:16]}"
    local = host.path(library)
    if local.is_file() and build_id.encode() in local.read_bytes():
        return
    cc = _host_cc(host, host_exec)
    if cc is None:
        plan.notes.append(f"no C compiler the installer can run on the node: no {library}, so pod daemons pass "
                          "every call through Python (docs/benchmarks.md)")
        return
    src = venv / "lib" / f"python{version[0]}.{version[1]}" / "site-packages" / PASSLANE_SOURCE
    new = library.with_name(f".{library.name}.new")

    def build() -> None:
        r = _compile(host, host_exec, cc, ["-shared", "-fPIC", "-pthread", f'-DKYB_BUILD_ID="{build_id}"'], src, new)
        if r.returncode != 0:
            host.path(new).unlink(missing_ok=True)
            print(f"note: building the pass lane failed ({r.stderr.strip()[-400:]}); pod daemons pass every call "
                  "through Python")
            return
        os.replace(host.path(new), local)

    plan.add(f"build {library} (the pass lane) from {src} with the node's {cc}", build)
    plan.shimd_changed = True


def plan_uninstall(plan: Plan, host: Host, args: argparse.Namespace) -> None:
    plan_containerd(plan, host, PurePosixPath(args.containerd_config), None, uninstall=True)
    for path in [*(BIN_DIR / n for n in LAUNCHERS), SHIM_PY]:
        p = host.path(path)
        if os.path.lexists(p):
            if _has_mark(p):
                plan.add(f"remove {path}", p.unlink)
            else:
                plan.notes.append(f"left {path}: not written by this installer")
    shimd_wants = host.path(SHIMD_UNIT_WANTS)
    if shimd_wants.is_symlink() and os.readlink(shimd_wants) == str(SHIMD_UNIT):
        plan.add(f"disable kybernate-shimd: remove {SHIMD_UNIT_WANTS}", shimd_wants.unlink)
    shimd_unit = host.path(SHIMD_UNIT)
    if shimd_unit.exists():
        if _has_mark(shimd_unit):
            plan.add(f"remove {SHIMD_UNIT}", shimd_unit.unlink)
            plan.shimd_changed = True
        else:
            plan.notes.append(f"left {SHIMD_UNIT}: not written by this installer")
    wants = host.path(UNIT_WANTS)
    if wants.is_symlink() and os.readlink(wants) == str(UNIT):
        plan.add(f"disable kybernate-hookd: remove {UNIT_WANTS}", wants.unlink)
    unit = host.path(UNIT)
    if unit.exists():
        if _has_mark(unit):
            plan.add(f"remove {UNIT}", unit.unlink)
            plan.hookd_changed = True
        else:
            plan.notes.append(f"left {UNIT}: not written by this installer")
    manifest = Manifest.load(host)
    opt = host.path(OPT)
    if opt.exists() and (any(opt.iterdir()) or not os.path.ismount(opt)):
        plan.add(f"remove {OPT} (every version's venv, the records and the installer copy)", lambda: _remove_dir(opt))
    plan_uninstall_created(plan, host, PurePosixPath(args.containerd_config), manifest)


# ---- checks before changing anything -------------------------------------------------------------


def check_writable(host: Host, plan: Plan, paths: list[PurePosixPath]) -> None:
    """Each path's nearest existing directory must be writable here (read-only mounts fail with EROFS)."""
    if not plan.changes:
        return
    for hp in paths:
        p = host.path(hp)
        while not p.exists() and p != host.root:
            p = p.parent
        d = p if p.is_dir() else p.parent
        if not os.access(d, os.W_OK):
            why = "read-only filesystem" if _read_only(d) else "permission denied (run as root)"
            shown = "/" + str(d.relative_to(host.root)) if d != host.root else "/"
            hint = "" if str(host.root) == "/" else f"; under --host-root {host.root}: mount it read-write"
            raise InstallError(f"cannot write {shown} on the node ({why})" + hint)


def _read_only(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _kybernate_shims() -> dict[int, list[str]]:
    """pid -> command line of every process that runs a containerd-shim-kybernate-v1 (any path)."""
    shims = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"containerd-shim-kybernate-v1") for a in argv[:2]):
                shims[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
    return shims


def running_kybernate_shims() -> list[int]:
    return sorted(_kybernate_shims())


# ---- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    here = Path(__file__).resolve()
    repo = here.parents[2] if len(here.parents) > 2 else here.parent  # packaging/installer/install.py
    p = argparse.ArgumentParser(
        prog="install.py",
        description="Install Kybernate on this node and register io.containerd.kybernate.v1 with containerd.",
        epilog="Docs: docs/install.md. Exit status: 0 done or nothing to do, 1 refused or failed, 2 usage.")
    p.add_argument("--host-root", type=Path, default=Path("/"),
                   help="where the node's / is mounted here [%(default)s]")
    p.add_argument("--wheels", type=Path,
                   help="directory of wheels (kybernate + dependencies), or of cp3XX/ subdirectories per Python")
    p.add_argument("--python", help="the node's interpreter for the venv (host path) [/usr/bin/python3]")
    p.add_argument("--containerd-config", default=DEFAULT_CONTAINERD_CONFIG,
                   help="containerd's config file (host path) [%(default)s]")
    p.add_argument("--source", type=Path, default=repo,
                   help="Kybernate checkout or payload holding containerd-config/ and packaging/systemd/ [%(default)s]")
    p.add_argument("--extras", default="s3",
                   help="extras of kybernate to install, comma-separated; their wheels must be in --wheels "
                        "(s3: the store's S3 tier, boto3) ['%(default)s'; '' for none]")
    p.add_argument("--uninstall", action="store_true",
                   help="take Kybernate out again: what the installs created (an edited runtime.toml stays)")
    p.add_argument("--dry-run", action="store_true", help="print every change and make none")
    p.add_argument("--restart-containerd", action="store_true",
                   help="restart containerd (systemctl) when its config changed; default: print the command")
    p.add_argument("--start-hookd", action="store_true",
                   help="install: daemon-reload and (re)start kybernate-hookd and kybernate-shimd now (systemctl)")
    p.add_argument("--stop-hookd", action="store_true",
                   help="uninstall: stop kybernate-hookd and kybernate-shimd first (systemctl)")
    p.add_argument("--host-exec", choices=("auto", "direct", "nsenter", "none"), default="auto",
                   help="how to run systemctl (and cc, for the native shim client) on the node: auto = directly "
                        "when --host-root is /, else not at all; "
                        "nsenter = through PID 1's mount namespace (a pod with hostPID) [%(default)s]")
    p.add_argument("--force", action="store_true", help="uninstall even while kybernate shims still run")
    args = p.parse_args(argv)
    if not args.uninstall and args.wheels is None:
        p.error("--wheels is required to install")
    if args.uninstall and args.start_hookd:
        p.error("--start-hookd is for installing; --stop-hookd goes with --uninstall")
    if not args.uninstall and args.stop_hookd:
        p.error("--stop-hookd goes with --uninstall")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except InstallError as e:
        print(f"install.py: error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    root = args.host_root.resolve()
    if not root.is_dir():
        raise InstallError(f"--host-root {args.host_root}: no such directory")
    host = Host(root)
    host_exec = pick_host_exec(args.host_exec, host)
    systemd = host.path("/run/systemd/system").is_dir()
    wants_systemctl = args.restart_containerd or args.start_hookd or args.stop_hookd
    if wants_systemctl and host_exec.mode == "none":
        raise InstallError("--restart-containerd/--start-hookd/--stop-hookd need the node's systemctl: run on the "
                           "node (--host-root /) or in a pod with hostPID and --host-exec nsenter")
    if wants_systemctl and not systemd:
        raise InstallError("the node does not run systemd (no /run/systemd/system): restart containerd and start "
                           "kybernate-hookd your own way, without --restart-containerd/--start-hookd/--stop-hookd")

    plan = Plan()
    if args.uninstall:
        plan_uninstall(plan, host, args)
        if host_exec.mode != "none" and not args.force and any(c.what.startswith("remove") for c in plan.changes):
            shims = running_kybernate_shims()
            if shims:
                raise InstallError(
                    f"{len(shims)} kybernate shim(s) still run (pids {', '.join(map(str, shims))}): their containers "
                    "need the launcher and the venv until they stop. Drain the node or delete those pods first "
                    "(or pass --force)")
    else:
        plan_install(plan, host, args, host_exec)
    config = PurePosixPath(args.containerd_config)
    check_writable(host, plan, [config.parent, config.parent / "conf.d", OPT, BIN_DIR, RUNTIME_TOML.parent,
                                UNIT.parent, UNIT_WANTS.parent, SHIMD_UNIT.parent])

    pending = not args.uninstall and host.path(RESTART_PENDING).exists()
    cmds = _host_commands(plan, args, restart=plan.containerd_config_changed or pending)
    if str(root) != "/":
        print(f"host root: {root}")
    if args.dry_run:
        print("dry run, nothing is changed; these changes would be made:" if plan.changes else
              "dry run: nothing would change")
        for c in plan.changes:
            _show(c, "would ")
        for n in plan.notes:
            print(f"note: {n}")
        for cmd in cmds:
            print(f"{'would run' if cmd.run else 'then run'}: {' '.join(cmd.argv)}  ({cmd.why})")
        if not args.uninstall:
            prune_versions(host, plan.version, dry_run=True)
        return 0

    failed = False
    for cmd in (c for c in cmds if c.before_changes):
        failed |= not _run_host_command(cmd, host, host_exec, config, args)
    done = 0
    created = None if args.uninstall else CreationLog(host, config)
    try:
        for c in plan.changes:
            _show(c, "")
            c.apply()
            done += 1
    except OSError as e:
        raise InstallError(f"failed at `{plan.changes[done].what}`: {e}; the {done} change(s) before it were made, "
                           "none after it: fix the cause and run again") from None
    finally:
        if created is not None:
            created.record()
    for n in plan.notes:
        print(f"note: {n}")
    if not args.uninstall and plan.containerd_config_changed:  # until a restart succeeds
        _write_atomic(host.path(RESTART_PENDING), b"containerd's config changed; containerd not restarted since\n",
                      0o644)
    for cmd in (c for c in cmds if not c.before_changes):
        failed |= not _run_host_command(cmd, host, host_exec, config, args)
    if not args.uninstall:  # after the hookd restart: the old hookd no longer holds its version
        prune_versions(host, plan.version, dry_run=False)
    if not plan.changes:
        print("nothing to change: " + ("Kybernate is not installed here" if args.uninstall else
                                       "Kybernate is installed and registered with containerd"))
    else:
        print("uninstalled" if args.uninstall else "installed")
    return 1 if failed else 0


def _show(c: Change, prefix: str) -> None:
    print(prefix + c.what)
    if c.diff:
        print("  " + c.diff.rstrip("\n").replace("\n", "\n  "))


@dataclass(frozen=True)
class HostCommand:
    why: str
    argv: list[str]
    run: bool  # False: printed for the operator to run
    before_changes: bool = False


def _host_commands(plan: Plan, args: argparse.Namespace, restart: bool) -> list[HostCommand]:
    """The systemctl commands the changes call for, in the order they must happen."""
    cmds: list[HostCommand] = []
    if args.uninstall:
        if plan.hookd_changed:
            cmds.append(HostCommand("stop the node daemon", ["systemctl", "stop", "kybernate-hookd"],
                                    args.stop_hookd, before_changes=True))
        if plan.shimd_changed:
            # KillMode=process: stopping it never touches the pods' shim daemons it forked.
            cmds.append(HostCommand("stop the resident shim starter", ["systemctl", "stop", "kybernate-shimd"],
                                    args.stop_hookd, before_changes=True))
        if plan.hookd_changed or plan.shimd_changed:
            cmds.append(HostCommand("forget the removed units", ["systemctl", "daemon-reload"], args.stop_hookd))
    else:
        if plan.hookd_changed or plan.shimd_changed:
            cmds.append(HostCommand("load the new units", ["systemctl", "daemon-reload"], args.start_hookd))
        if plan.hookd_changed:
            cmds.append(HostCommand("start the node daemon on the new files",
                                    ["systemctl", "restart", "kybernate-hookd"], args.start_hookd))
        elif args.start_hookd:
            cmds.append(HostCommand("make sure the node daemon runs", ["systemctl", "start", "kybernate-hookd"], True))
        # Running pods keep their shim daemons across this restart: they never depend on it.
        if plan.shimd_changed:
            cmds.append(HostCommand("start the resident shim starter on the new files",
                                    ["systemctl", "restart", "kybernate-shimd"], args.start_hookd))
        elif args.start_hookd:
            cmds.append(HostCommand("make sure the resident shim starter runs",
                                    ["systemctl", "start", "kybernate-shimd"], True))
    if restart:
        why = "load the changed config" if plan.containerd_config_changed else "load the config an earlier run changed"
        cmds.append(HostCommand(why + "; running containers keep running", ["systemctl", "restart", "containerd"],
                                args.restart_containerd))
    return cmds


def _run_host_command(cmd: HostCommand, host: Host, host_exec: HostExec, config: PurePosixPath,
                      args: argparse.Namespace) -> bool:
    if not cmd.run:
        print(f"to do: {' '.join(cmd.argv)}  ({cmd.why})")
        return True
    if cmd.argv == ["systemctl", "restart", "containerd"]:
        # Never restart into a config containerd cannot load: ask containerd itself first.
        check = host_exec.run(["containerd", "--config", str(config), "config", "dump"], timeout=60)
        ours = (RUNTIME_TYPE, str(BIN_DIR / LAUNCHERS[0]))
        if check.returncode != 0 or (not args.uninstall and not any(mark in check.stdout for mark in ours)):
            said = (check.stderr.strip() or "the kybernate runtime is not in its output")[-800:]
            print(f"install.py: error: `containerd --config {config} config dump` does not accept the new config "
                  f"({said}); containerd NOT restarted", file=sys.stderr)
            return False
    print(f"running: {' '.join(host_exec.argv(cmd.argv))}  ({cmd.why})")
    r = host_exec.run(cmd.argv)
    if r.returncode != 0:
        print(f"install.py: error: {' '.join(cmd.argv)} exited {r.returncode}: {r.stderr.strip()}", file=sys.stderr)
        return False
    if cmd.argv[-1] == "containerd":
        host.path(RESTART_PENDING).unlink(missing_ok=True)
    return True


if __name__ == "__main__":
    sys.exit(main())
