"""What a checkpoint looks like, as the shim and the `kybernate` tool both read and write it.

A checkpoint archive (the layout of CRI's CheckpointContainer, which `kybernate checkpoint` writes too):

    checkpoint/        the CRIU images, and kybernate.json (manifest.py) for GPU containers
    rootfs-diff.tar    the container's file changes against its image
    deleted.files      JSON list of the image's files the container removed (only when there are any)
    config.dump        id, name, image, runtime, times
    spec.dump          the container's OCI runtime spec
"""

from __future__ import annotations

CHECKPOINT_DIR = "checkpoint"
ROOTFS_DIFF = "rootfs-diff.tar"
DELETED_FILES = "deleted.files"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"

# Overlay whiteouts, as containerd's diff writes them into a layer tar: `.wh.NAME` deletes NAME, and the
# opaque marker empties its directory.
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

# runc's checkpoint options in a Tasks.Checkpoint request: the bare full name, as containerd's Go client
# writes it for this protobuf message.
CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"
