"""Where the provisioned test stack lives: PREFIX/stack.json, written by packaging/stack/provision.sh."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERSIONS = ("1.6", "2.1")


class StackMissing(RuntimeError):
    """stack.json is absent or unreadable; the message says how to provision."""


@dataclass(frozen=True, slots=True)
class ContainerdBinaries:
    containerd: Path
    ctr: Path
    # Holds that version's own containerd-shim-runc-v2; goes first on containerd's PATH.
    bin_dir: Path
    version: str


@dataclass(frozen=True, slots=True)
class Stack:
    prefix: Path
    containerd: dict[str, ContainerdBinaries]
    runc: Path
    criu: Path
    criu_dir: Path
    checkpointctl: Path
    cni_bin_dir: Path
    busybox: Path


def stack_prefix() -> Path:
    return Path(os.environ.get("STACK_PREFIX") or REPO / ".stack")


def load_stack(prefix: Path | None = None) -> Stack:
    prefix = prefix or stack_prefix()
    path = prefix / "stack.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise StackMissing(f"no test stack at {path}: run `make stack` (STACK_PREFIX={prefix})") from None
    except (OSError, ValueError) as e:
        raise StackMissing(f"unreadable {path} ({e}): run `make stack` again") from None
    try:
        stack = Stack(
            prefix=Path(raw["prefix"]),
            containerd={
                v: ContainerdBinaries(Path(c["containerd"]), Path(c["ctr"]), Path(c["bin_dir"]), c["version"])
                for v, c in raw["containerd"].items()
            },
            runc=Path(raw["runc"]),
            criu=Path(raw["criu"]),
            criu_dir=Path(raw["criu_dir"]),
            checkpointctl=Path(raw["checkpointctl"]),
            cni_bin_dir=Path(raw["cni_bin_dir"]),
            busybox=Path(raw["busybox"]),
        )
    except (KeyError, TypeError) as e:
        raise StackMissing(f"{path} lacks {e}: it predates this harness; run `make stack` again") from None
    missing = [str(p) for p in _files(stack) if not p.exists()]
    if missing:
        raise StackMissing(f"{path} names missing files ({', '.join(missing)}): run `make stack` again")
    return stack


def rclone_binary(prefix: Path | None = None) -> Path:
    """The tests' S3 server binary (`rclone serve s3`): stack.json's "rclone", provisioned by `make stack`."""
    prefix = prefix or stack_prefix()
    path = prefix / "stack.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise StackMissing(f"no test stack at {path}: run `make stack` (STACK_PREFIX={prefix})") from None
    except (OSError, ValueError) as e:
        raise StackMissing(f"unreadable {path} ({e}): run `make stack` again") from None
    rclone = raw.get("rclone") if isinstance(raw, dict) else None
    if not rclone:
        raise StackMissing(f"{path} names no rclone (the tests' S3 server): run `make stack` again "
                           f"(STACK_PREFIX={prefix})")
    if not Path(rclone).exists():
        raise StackMissing(f"{path} names {rclone}, which is missing: run `make stack` again")
    return Path(rclone)


def _files(stack: Stack) -> list[Path]:
    files = [stack.runc, stack.criu, stack.checkpointctl, stack.busybox, stack.cni_bin_dir]
    for c in stack.containerd.values():
        files += [c.containerd, c.ctr, c.bin_dir / "containerd-shim-runc-v2"]
    return files
