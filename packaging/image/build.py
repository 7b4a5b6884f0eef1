#!/usr/bin/env python3
"""Build the node installer image without a container daemon: an OCI image layout tar for `ctr images import`.

packaging/installer/Dockerfile runs this same script (`--layer`) in its build stage and copies the root
filesystem it writes into an empty image: one program, one set of pinned lists (debs.txt, constraints.txt,
build-tools.txt), so both give the same contents by construction.

- root filesystem: the pinned Debian 12 packages of packaging/image/debs.txt (python3.11, dash, coreutils,
  util-linux for nsenter), fetched with `apt-get download` and unpacked as `dpkg -x` would (maintainer
  scripts are not run; the merged-/usr links and /etc/passwd are added here), documentation left out;
- /payload/wheels/cpXY/: the kybernate wheel built from this checkout plus its dependencies for CPython
  3.11, 3.12 and 3.13 on this machine's architecture, with the extras of EXTRAS (`pip download`, every
  version pinned by packaging/image/constraints.txt: an unpinned wheel fails the build), the layout
  install.py --wheels expects;
- /payload/packaging/installer/install.py, /payload/packaging/systemd/, /payload/containerd-config/;
- entrypoint `python3 /payload/packaging/installer/install.py`, command `--help`.

Reproducible: entries sorted, owners and mtimes fixed, gzip without a timestamp, no build date anywhere, so
the same inputs give the same image digest. Downloads are cached outside the repository ($KYB_IMAGE_CACHE,
default /var/tmp/kyb-image-cache); a build whose inputs did not change reuses its output.

Usage: packaging/image/build.py [--out build/kybernate-node-installer.tar] [--version-label L] [--list]
       packaging/image/build.py --layer rootfs.tar   (the uncompressed root filesystem only: the Dockerfile's)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEBS_LIST = HERE / "debs.txt"
CONSTRAINTS = HERE / "constraints.txt"
BUILD_TOOLS = HERE / "build-tools.txt"
# kybernate's extras the payload carries (install.py installs them by default): s3 = the store's S3 tier.
EXTRAS = ("s3",)
PYTHONS = ("3.11", "3.12", "3.13")
IMAGE_REPO = "kybernate.local/node-installer"
# What the kybernate wheel is built from (as in the Dockerfile's first stage).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "shim", "hooks", "proto")
# What /payload holds besides the wheels (as the Dockerfile's COPY lines).
PAYLOAD_FILES = ("packaging/installer/install.py", "packaging/systemd/kybernate-hookd.service",
                 "packaging/systemd/kybernate-shimd.service", "containerd-config")
# Left out of the root filesystem, as slim images do: nothing here reads them.
EXCLUDE = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/locale/", "usr/share/lintian/",
           "usr/share/bug/", "usr/share/doc-base/", "usr/share/bash-completion/")
# Debian 12 systems have merged /usr: these top-level names are links into /usr.
MERGED_USR = ("bin", "lib", "lib64", "sbin")
SOURCE_DATE_EPOCH = 315532800  # 1980-01-01: the earliest date a wheel's zip entries can carry
ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE=1",
       "PYTHONUNBUFFERED=1"]
ENTRYPOINT = ["python3", "/payload/packaging/installer/install.py"]
CMD = ["--help"]

_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class BuildError(Exception):
    """A build step failed; the message says which and why."""


@dataclass(frozen=True)
class Entry:
    """One file of the root filesystem, normalised: type, mode, owner, link target and content."""

    path: str
    kind: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    data: bytes = b""


@dataclass(frozen=True)
class Image:
    name: str
    path: Path
    manifest_digest: str
    size: int
    layer_size: int
    layer_uncompressed: int
    reused: bool


def log(msg: str) -> None:
    print(f"[image] {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- inputs ---------------------------------------------------------------------------------------


def read_debs() -> list[tuple[str, str]]:
    out = []
    for line in DEBS_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("=")
            if not version:
                raise BuildError(f"{DEBS_LIST}: {line!r} has no =version: every package is pinned")
            out.append((name, version))
    return sorted(out)


def deb_arch() -> str:
    return _run(["dpkg", "--print-architecture"]).strip()


def fetch_debs(cache: Path, debs: list[tuple[str, str]], arch: str) -> list[Path]:
    d = cache / "debs"
    d.mkdir(parents=True, exist_ok=True)

    def cached(name: str, version: str) -> Path:
        # Architecture-independent packages (pure Python ones) are named _all.deb.
        stem = f"{name}_{version.replace(':', '%3a')}"
        found = d / f"{stem}_{arch}.deb"
        return found if found.is_file() else d / f"{stem}_all.deb"

    missing = [f"{n}={v}" for n, v in debs if not cached(n, v).is_file()]
    if missing:
        log(f"apt-get download {len(missing)} package(s)")
        _run(["apt-get", "download", "-q", *missing], cwd=d, timeout=600)
    paths = [cached(n, v) for n, v in debs]
    for p in paths:
        if not p.is_file():
            raise BuildError(f"apt-get download did not produce {p.name}: is the version in debs.txt still served?")
    return paths


def source_digest(paths: list[Path], base: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc" or ".egg-info" in str(f):
                continue
            h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def build_kybernate_wheel(cache: Path, label: str) -> Path:
    """kybernate's wheel from this checkout (py3-none-any), reproducible: SOURCE_DATE_EPOCH fixes zip dates."""
    key = source_digest([ROOT / s for s in WHEEL_SOURCES], ROOT)[:16] + (f"-{label}" if label else "")
    out = cache / "kybernate-wheel" / key
    found = sorted(out.glob("kybernate-*.whl")) if out.is_dir() else []
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(prefix="kyb-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for s in WHEEL_SOURCES:
            if (ROOT / s).is_dir():
                shutil.copytree(ROOT / s, src / s, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                shutil.copy(ROOT / s, src / s)
        if label:  # a second version of the same code, for upgrade tests: 0.1.0 -> 0.1.0+label
            text = (src / "pyproject.toml").read_text()
            new = re.sub(r'(?m)^version = "([^"]+)"$', rf'version = "\1+{label}"', text, count=1)
            if new == text:
                raise BuildError("pyproject.toml has no `version = \"...\"` line to label")
            (src / "pyproject.toml").write_text(new)
        dist = Path(tmp) / "dist"
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "PYTHONHASHSEED": "0"}
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
              "--disable-pip-version-check", "-w", str(dist), str(src)], env=env)
        wheels = sorted(dist.glob("kybernate-*.whl"))
        if len(wheels) != 1:
            raise BuildError(f"pip wheel made {[w.name for w in wheels]}, expected one kybernate wheel")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(wheels[0], out / wheels[0].name)
        return out / wheels[0].name


def read_pins(path: Path) -> dict[str, str]:
    """name (normalized) -> version of a `name==version` list; anything else in it is an error."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
            if not m:
                raise BuildError(f"{path}: {line!r} is not name==version: every entry is pinned")
            pins[_normalize(m.group(1))] = m.group(2)
    return pins


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_build_tools() -> None:
    """The kybernate wheel's bytes name the setuptools that built them: only the pinned one builds it."""
    pins = read_pins(BUILD_TOOLS)
    have = _run([sys.executable, "-c", "import setuptools; print(setuptools.__version__)"]).strip()
    if have != pins["setuptools"]:
        raise BuildError(f"{sys.executable} has setuptools {have}; the image is built with setuptools=="
                         f"{pins['setuptools']} ({BUILD_TOOLS.name}): pip install -r {BUILD_TOOLS}")


def download_dependencies(cache: Path, kyb_wheel: Path, python: str, machine: str) -> list[Path]:
    """The dependency wheels of kybernate and its EXTRAS for one CPython, pinned by constraints.txt; cached per
    input."""
    tag = "cp" + python.replace(".", "")
    requires = [line for line in _wheel_metadata(kyb_wheel).splitlines() if line.startswith("Requires-Dist:")]
    key = _sha256(("\n".join(requires) + CONSTRAINTS.read_text() + machine + ",".join(EXTRAS)).encode())[:16]
    d = cache / "wheels" / f"{tag}-{machine}-{key}"
    stamp = d / ".complete"
    if not stamp.exists():
        log(f"pip download the dependencies for CPython {python} ({machine})")
        d.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
              "--implementation", "cp", "--python-version", python,
              "--platform", f"manylinux2014_{machine}", "--platform", f"manylinux_2_28_{machine}",
              "-c", str(CONSTRAINTS), "-d", str(d), f"{kyb_wheel}[{','.join(EXTRAS)}]"], timeout=600)
        for w in d.glob("kybernate-*.whl"):  # the checkout's wheel goes in separately
            w.unlink()
        pins = read_pins(CONSTRAINTS)
        for w in d.glob("*.whl"):
            name, version = w.name.split("-")[:2]
            if pins.get(_normalize(name)) != version:
                raise BuildError(f"pip download chose {w.name}, which {CONSTRAINTS.name} does not pin: add "
                                 f"{name}=={version} there (after checking it)")
        for needed in ("grpcio", "boto3"):
            if not list(d.glob(f"{needed}-*.whl")):
                raise BuildError(f"pip download left no {needed} wheel for CPython {python} in {d}")
        stamp.write_text("\n".join(sorted(w.name for w in d.glob("*.whl"))) + "\n")
    return sorted(d.glob("*.whl"))


def _wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return z.read(name).decode()


# ---- the root filesystem --------------------------------------------------------------------------


def _usr_path(path: str) -> str:
    head, _, rest = path.partition("/")
    return f"usr/{head}/{rest}".rstrip("/") if head in MERGED_USR else path


def deb_entries(deb: Path) -> list[Entry]:
    """The files of one .deb as `dpkg -x` would lay them out, on merged /usr, without documentation."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True,
                          timeout=120).stdout
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar.getmembers():
            path = _usr_path(m.name.removeprefix("./").rstrip("/"))
            if not path or path.startswith("..") or any((path + "/").startswith(x) for x in EXCLUDE):
                continue
            if m.isdir():
                out.append(Entry(path, tarfile.DIRTYPE, m.mode, m.uid, m.gid))
            elif m.issym():
                out.append(Entry(path, tarfile.SYMTYPE, 0o777, m.uid, m.gid, m.linkname))
            elif m.islnk():
                out.append(Entry(path, tarfile.LNKTYPE, m.mode, m.uid, m.gid,
                                 _usr_path(m.linkname.removeprefix("./"))))
            elif m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out.append(Entry(path, tarfile.REGTYPE, m.mode, m.uid, m.gid, data=f.read()))
            else:
                raise BuildError(f"{deb.name}: {m.name} is neither file, directory nor link")
    return out


def rootfs(debs: list[Path], payload: dict[str, bytes]) -> dict[str, Entry]:
    files: dict[str, Entry] = {}
    for deb in debs:
        for e in deb_entries(deb):
            old = files.get(e.path)
            if old is not None and old.kind != tarfile.DIRTYPE and old != e:
                raise BuildError(f"{deb.name} ships {e.path}, which another package already ships differently")
            files[e.path] = e
    for name in MERGED_USR:
        files[name] = Entry(name, tarfile.SYMTYPE, 0o777, linkname=f"usr/{name}")
    for d, mode in (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777),
                    ("root", 0o700), ("var/tmp", 0o1777), ("host", 0o755)):
        files.setdefault(d, Entry(d, tarfile.DIRTYPE, mode))
    for path, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
        files[path] = Entry(path, tarfile.REGTYPE, 0o644, data=text.encode())
    # A pure-Python wheel (boto3, botocore: most of the payload) is the same file for every CPython: the later
    # copies are hard links to the first (in sorted order, as the layer lists them), stored once.
    first: dict[bytes, str] = {}
    for path in sorted(payload):
        data = payload[path]
        mode = 0o755 if path.endswith("install.py") else 0o644
        digest = hashlib.sha256(data).digest()
        if path.endswith(".whl") and digest in first:
            files[path] = Entry(path, tarfile.LNKTYPE, mode, linkname=first[digest])
        else:
            first.setdefault(digest, path)
            files[path] = Entry(path, tarfile.REGTYPE, mode, data=data)
    for path in list(files):  # every parent directory is an entry of its own
        parent = PurePosixPath(path).parent
        while str(parent) != ".":
            files.setdefault(str(parent), Entry(str(parent), tarfile.DIRTYPE, 0o755))
            parent = parent.parent
    return files


def layer_tar(files: dict[str, Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(files):
            e = files[path]
            info = tarfile.TarInfo(path)
            info.type, info.mode, info.uid, info.gid, info.linkname = e.kind, e.mode, e.uid, e.gid, e.linkname
            info.mtime, info.uname, info.gname, info.size = 0, "", "", len(e.data)
            tar.addfile(info, io.BytesIO(e.data) if e.kind == tarfile.REGTYPE else None)
    return out.getvalue()


# ---- the OCI layout -------------------------------------------------------------------------------


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def oci_tar(path: Path, name: str, layer: bytes, arch: str, version: str) -> tuple[str, int]:
    gz = gzip.compress(layer, compresslevel=6, mtime=0)
    config = _json({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ENV, "Entrypoint": ENTRYPOINT, "Cmd": CMD, "WorkingDir": "/",
                   "Labels": {"org.opencontainers.image.title": "kybernate-node-installer",
                              "org.opencontainers.image.version": version}},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + _sha256(layer)]},
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": _OCI_MANIFEST,
        "config": {"mediaType": _OCI_CONFIG, "digest": "sha256:" + _sha256(config), "size": len(config)},
        "layers": [{"mediaType": _OCI_LAYER, "digest": "sha256:" + _sha256(gz), "size": len(gz)}],
    })
    index = _json({
        "schemaVersion": 2,
        "mediaType": _OCI_INDEX,
        "manifests": [{
            "mediaType": _OCI_MANIFEST, "digest": "sha256:" + _sha256(manifest), "size": len(manifest),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        }],
    })
    blobs = {f"blobs/sha256/{_sha256(b)}": b for b in (gz, config, manifest)}
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for fname, data in sorted({"oci-layout": _json({"imageLayoutVersion": "1.0.0"}), "index.json": index,
                                   **blobs}.items()):
            info = tarfile.TarInfo(fname)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return "sha256:" + _sha256(manifest), len(gz)


# ---- build ----------------------------------------------------------------------------------------


def build(out: Path, *, label: str = "", cache: Path | None = None) -> Image:
    cache = cache or Path(os.environ.get("KYB_IMAGE_CACHE", "/var/tmp/kyb-image-cache"))
    arch, machine = deb_arch(), platform.machine()
    version = re.search(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())
    if not version:
        raise BuildError("pyproject.toml: no version")
    tag = version.group(1) + (f"-{label}" if label else "")
    name = f"{IMAGE_REPO}:{tag}"
    # Everything the output depends on; the same key means the same bytes, so the last output is reused.
    key = _sha256("\n".join([
        name, arch, machine, DEBS_LIST.read_text(), CONSTRAINTS.read_text(), BUILD_TOOLS.read_text(),
        ",".join(PYTHONS), ",".join(EXTRAS), label,
        source_digest([ROOT / s for s in WHEEL_SOURCES] + [ROOT / p for p in PAYLOAD_FILES], ROOT),
        Path(__file__).read_text()]).encode())
    stamp = out.with_name(out.name + ".json")
    if out.is_file() and stamp.is_file():
        meta = json.loads(stamp.read_text())
        if meta.get("key") == key:
            return Image(name, out, meta["manifest_digest"], out.stat().st_size, meta["layer_size"],
                         meta["layer_uncompressed"], reused=True)
    layer = build_layer(cache, label)
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, layer_size = oci_tar(out, name, layer, arch, tag)
    stamp.write_text(json.dumps({"key": key, "name": name, "manifest_digest": digest, "layer_size": layer_size,
                                 "layer_uncompressed": len(layer)}, indent=2) + "\n")
    return Image(name, out, digest, out.stat().st_size, layer_size, len(layer), reused=False)


def build_layer(cache: Path, label: str = "") -> bytes:
    """The image's one layer, uncompressed: its root filesystem as a tar (the Dockerfile copies exactly this)."""
    check_build_tools()
    arch, machine = deb_arch(), platform.machine()
    deb_paths = fetch_debs(cache, read_debs(), arch)
    kyb = build_kybernate_wheel(cache, label)
    payload: dict[str, bytes] = {}
    for py in PYTHONS:
        tag_dir = "cp" + py.replace(".", "")
        for w in [kyb, *download_dependencies(cache, kyb, py, machine)]:
            payload[f"payload/wheels/{tag_dir}/{w.name}"] = w.read_bytes()
    for p in PAYLOAD_FILES:
        src = ROOT / p
        for f in sorted(src.rglob("*")) if src.is_dir() else [src]:
            if f.is_file() and "__pycache__" not in f.parts:
                payload[f"payload/{f.relative_to(ROOT)}"] = f.read_bytes()
    return layer_tar(rootfs(deb_paths, payload))


def list_files(image: Path) -> list[str]:
    """The paths in the image's layer, one per line, as `find` in a container of it would print them."""
    with tarfile.open(image) as outer:
        index = json.load(outer.extractfile("index.json"))  # type: ignore[arg-type]
        mdigest = index["manifests"][0]["digest"].removeprefix("sha256:")
        manifest = json.load(outer.extractfile(f"blobs/sha256/{mdigest}"))  # type: ignore[arg-type]
        ldigest = manifest["layers"][0]["digest"].removeprefix("sha256:")
        blob = outer.extractfile(f"blobs/sha256/{ldigest}")
        assert blob is not None
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob.read()))) as layer:
            return sorted("/" + m.name for m in layer.getmembers())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "build" / "kybernate-node-installer.tar")
    p.add_argument("--version-label", default="", help="build kybernate as <version>+LABEL (a second version)")
    p.add_argument("--list", action="store_true", help="print the image's file list instead of building")
    p.add_argument("--layer", type=Path, help="write only the root filesystem (uncompressed layer tar) there")
    args = p.parse_args(argv)
    if args.version_label and not re.fullmatch(r"[a-z0-9]+", args.version_label):
        p.error("--version-label: lower-case letters and digits only")
    if args.list:
        print("\n".join(list_files(args.out)))
        return 0
    started = time.monotonic()
    if args.layer:
        try:
            layer = build_layer(Path(os.environ.get("KYB_IMAGE_CACHE", "/var/tmp/kyb-image-cache")), args.version_label)
        except (BuildError, subprocess.CalledProcessError) as e:
            print(f"build.py: error: {e}", file=sys.stderr)
            return 1
        args.layer.write_bytes(layer)
        print(f"{args.layer}: sha256:{_sha256(layer)} ({len(layer) / 1024 / 1024:.1f} MiB) in "
              f"{time.monotonic() - started:.1f} s")
        return 0
    try:
        img = build(args.out.resolve(), label=args.version_label)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    mib = 1024 * 1024
    print(f"{img.name} {img.manifest_digest} {img.path} ({img.size / mib:.1f} MiB tar, layer "
          f"{img.layer_size / mib:.1f} MiB gzip / {img.layer_uncompressed / mib:.1f} MiB unpacked)"
          f"{' unchanged' if img.reused else ''} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
