"""The GPU manifest on disk: `kybernate.json` in a checkpoint directory. The one reader and writer of it.

The shim writes it beside the CRIU images at checkpoint and reads it back at restore; the `kybernate` tool
carries it in archives. Standard library only, so the shim's Create and Checkpoint pay microseconds for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .model import GpuManifest, ManifestError

# The GPU manifest's file name inside a checkpoint directory.
MANIFEST_FILE = "kybernate.json"


def read_manifest(checkpoint_dir: str | Path) -> GpuManifest | None:
    """The manifest in `checkpoint_dir`, or None when there is none; ManifestError names the file if it is bad."""
    path = Path(checkpoint_dir) / MANIFEST_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return GpuManifest.from_json(text)
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from err


def write_manifest(checkpoint_dir: str | Path, manifest: GpuManifest) -> None:
    """Write it atomically (a temporary file renamed into place): a reader never sees half a manifest."""
    path = Path(checkpoint_dir) / MANIFEST_FILE
    tmp = path.with_name(MANIFEST_FILE + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
