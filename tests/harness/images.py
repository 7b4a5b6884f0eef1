"""Test images without a registry: OCI image layout tars around one static busybox, for `ctr images import`.

The output is byte-for-byte deterministic for a given busybox binary (fixed mtimes, owners and order), so
the same image always gets the same digest and containerd's content store dedupes repeated imports.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .containerd import Containerd

BUSYBOX_IMAGE = "kyb.local/busybox:1"
# Named like the sandbox image the harness configures for CRI (see containerd.py).
PAUSE_IMAGE = "kyb.local/pause:1"

_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# Uncompressed: the layer is ~1 MB, and skipping gzip keeps building and unpacking instant.
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True, slots=True)
class ImageTar:
    name: str
    path: Path
    manifest_digest: str


def build_image(
    path: Path,
    name: str,
    busybox: Path,
    *,
    cmd: list[str],
    entrypoint: list[str] | None = None,
    env: list[str] | None = None,
) -> ImageTar:
    """Write an OCI layout tar for image `name` (`repo:tag`) to `path`: busybox plus its applets in /bin."""
    layer = _rootfs_layer(busybox)
    layer_digest = _digest(layer)
    config = _json({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": env or ["PATH=/bin"],
            **({"Entrypoint": entrypoint} if entrypoint else {}),
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": _OCI_MANIFEST,
        "config": {"mediaType": _OCI_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": _OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
    })
    index = _json({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": _OCI_MANIFEST,
            "digest": _digest(manifest),
            "size": len(manifest),
            "platform": {"architecture": "amd64", "os": "linux"},
            # ctr import names the image after this annotation.
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
            },
        }],
    })
    files = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    for blob in (layer, config, manifest):
        files[f"blobs/sha256/{_digest(blob).removeprefix('sha256:')}"] = blob
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(_info(d, tarfile.DIRTYPE, 0o755))
        for fname in sorted(files):
            data = files[fname]
            tar.addfile(_info(fname, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    return ImageTar(name, path, _digest(manifest))


def busybox_image(directory: Path, busybox: Path) -> ImageTar:
    return build_image(directory / "busybox.tar", BUSYBOX_IMAGE, busybox, cmd=["sh"])


def pause_image(directory: Path, busybox: Path) -> ImageTar:
    # CRI kills the sandbox with SIGKILL, so a plain long sleep is a sufficient pause process.
    return build_image(directory / "pause.tar", PAUSE_IMAGE, busybox, cmd=["sleep", "2147483647"])


def import_image(ctrd: Containerd, image: ImageTar, namespace: str | None = None) -> None:
    ctrd.ctr("images", "import", str(image.path), namespace=namespace, timeout=120)


def _rootfs_layer(busybox: Path) -> bytes:
    binary = busybox.read_bytes()
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("root", 0o700),
                        ("sys", 0o555), ("tmp", 0o1777), ("var", 0o755)):
            tar.addfile(_info(d, tarfile.DIRTYPE, mode))
        tar.addfile(_info("bin/busybox", tarfile.REGTYPE, 0o755, size=len(binary)), io.BytesIO(binary))
        for applet in sorted(set(applets) - {"busybox"}):
            tar.addfile(_info(f"bin/{applet}", tarfile.SYMTYPE, 0o777, linkname="busybox"))
        for fname, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            tar.addfile(_info(fname, tarfile.REGTYPE, 0o644, size=len(data)), io.BytesIO(data))
    return out.getvalue()


def _info(name: str, kind: bytes, mode: int, *, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
