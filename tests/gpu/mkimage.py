#!/usr/bin/env python3
"""Write a tiny OCI image layout tar that `ctr images import` accepts, with no registry.

The image is a skeleton meant to be completed by read-only bind mounts of the host (its /usr, /etc,
the directory that holds python + torch, the driver libraries). It contains:

* the top-level directories those mounts need (empty mount points) and /tmp (1777), /out, /kyb;
* for /bin, /sbin, /lib, /lib32, /lib64, /libx32: the same symlink the host has (merged /usr), or an
  empty directory when the host has a real directory there (the caller then bind-mounts it);
* a static busybox at /bb/busybox (for debugging: `ctr t exec ... /bb/busybox sh`).

One uncompressed layer, so its digest is its diff_id. Stdlib only (runs on the GPU machine).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile

ROOT_LINK_CANDIDATES = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, 0
    tar.addfile(ti)


def _add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, target, 0o777, 0
    tar.addfile(ti)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), mode, 0
    tar.addfile(ti, io.BytesIO(data))


def build_layer(busybox: str | None, extra_dirs: list[str], host_root: str = "/") -> tuple[bytes, list[str]]:
    """Return the layer tar bytes and the list of host root entries that need a bind mount."""
    buf = io.BytesIO()
    need_bind: list[str] = []
    dirs = {"dev", "proc", "sys", "etc", "usr", "opt", "run", "var", "root", "out", "kyb", "bb", "home"}
    dirs.update(d.strip("/").split("/")[0] for d in extra_dirs if d.strip("/"))
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ROOT_LINK_CANDIDATES:
            p = os.path.join(host_root, name)
            if os.path.islink(p):
                _add_link(tar, name, os.readlink(p))
                dirs.discard(name)
            elif os.path.isdir(p):
                dirs.add(name)
                need_bind.append("/" + name)
        for d in sorted(dirs):
            _add_dir(tar, d)
        _add_dir(tar, "tmp", 0o1777)
        _add_dir(tar, "var/tmp", 0o1777)
        # Files some tools expect; /etc is normally bind-mounted from the host over this.
        if busybox:
            with open(busybox, "rb") as f:
                _add_bytes(tar, "bb/busybox", f.read(), 0o755)
    return buf.getvalue(), need_bind


def write_layout(out: str, name: str, layer: bytes, env: list[str]) -> dict:
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": env, "Cmd": ["/bb/busybox", "sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "kybernate tests/gpu/mkimage.py"}],
    }
    config_b = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = "sha256:" + hashlib.sha256(config_b).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config_b)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": len(layer)}],
    }
    manifest_b = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest_b).hexdigest()
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": len(manifest_b),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": tag},
        }],
    }
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add_bytes(tar, "index.json", json.dumps(index, sort_keys=True).encode())
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        for digest, data in ((layer_digest, layer), (config_digest, config_b), (manifest_digest, manifest_b)):
            _add_bytes(tar, "blobs/sha256/" + digest.split(":", 1)[1], data)
    return {"name": name, "manifest": manifest_digest, "layer": layer_digest, "layer_bytes": len(layer)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="OCI layout tar to write")
    p.add_argument("--name", default="docker.io/kybernate/gpu-skeleton:latest")
    p.add_argument("--busybox", help="static busybox binary to put at /bb/busybox")
    p.add_argument("--mountpoint", action="append", default=[],
                   help="extra top-level mount point directory to create (repeatable)")
    p.add_argument("--host-root", default="/", help="host root to mirror the /bin,/lib symlinks from")
    p.add_argument("--env", action="append", default=[],
                   help="image Env entry (default PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/bb)")
    a = p.parse_args(argv)
    env = a.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/bb"]
    layer, need_bind = build_layer(a.busybox, a.mountpoint, a.host_root)
    info = write_layout(a.out, a.name, layer, env)
    info["host_dirs_to_bind"] = need_bind
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
