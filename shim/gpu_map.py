"""Which GPU a restored container's checkpointed GPUs land on: the `kybernate.io/gpu-map` annotation, or else
the new container's own GPUs (its NVIDIA_VISIBLE_DEVICES, as a device plugin sets it).

Parsed at Create (a bad value fails it with INVALID_ARGUMENT before anything starts); the map itself is
planned at the GPU restore, when the checkpoint's manifest names the GPUs it used. hookd checks the pairs
against the node (same model, free VRAM) and passes them to the driver.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .annotation_limits import GPU_MAP

if TYPE_CHECKING:  # the manifest's dataclasses stay off the shim's start path (taskspec imports this module)
    from kybernate.hooks.api.model import GpuManifest

VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
MAX_GPUS = 16
_UUID = re.compile(r"GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_INDEX = re.compile(r"[0-9]{1,3}")


class GpuMapError(ValueError):
    """A bad gpu-map annotation or device list; the message names it and what it wants."""


@dataclass(frozen=True, slots=True)
class GpuTargets:
    """What a container says about the GPUs its restore lands on."""

    explicit: tuple[tuple[str, str], ...] = ()  # kybernate.io/gpu-map pairs, old uuid -> new uuid
    visible: tuple[str, ...] = ()  # the container's GPUs: UUIDs or NVML indexes; empty: not said

    def __bool__(self) -> bool:
        return bool(self.explicit or self.visible)

    @property
    def needs_node_gpus(self) -> bool:
        """Indexes must be resolved to UUIDs with the node's inventory (hookd's health answer)."""
        return not self.explicit and any(not _is_uuid(v) for v in self.visible)


def targets_from_spec(notes: Mapping[str, object], env: Sequence[object]) -> GpuTargets:
    """The annotation if given, else the container's NVIDIA_VISIBLE_DEVICES (UUIDs or indexes; `all`,
    `none`, `void` or unset say nothing). Raises GpuMapError for a bad value."""
    raw = notes.get(GPU_MAP)
    if raw is not None:
        return GpuTargets(explicit=parse_annotation(str(raw)))
    for entry in env:
        name, _, value = str(entry).partition("=")
        if name == VISIBLE_DEVICES:
            return GpuTargets(visible=parse_visible(value))
    return GpuTargets()


def parse_annotation(text: str) -> tuple[tuple[str, str], ...]:
    """`<old uuid>=<new uuid>[,...]` -> pairs; each old GPU once, each new GPU once."""
    pairs: list[tuple[str, str]] = []
    items = [i.strip() for i in text.split(",") if i.strip()]
    if not items:
        raise GpuMapError(f"annotation {GPU_MAP}: empty; want <old uuid>=<new uuid>[,...]")
    if len(items) > MAX_GPUS:
        raise GpuMapError(f"annotation {GPU_MAP}: {len(items)} pairs, more than {MAX_GPUS}")
    for item in items:
        old, sep, new = item.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not _is_uuid(old) or not _is_uuid(new):
            raise GpuMapError(f"annotation {GPU_MAP}: {item[:90]!r} is not <old uuid>=<new uuid> "
                              "(UUIDs as nvidia-smi -L spells them: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
        pairs.append((_norm(old), _norm(new)))
    for side, what in ((0, "old"), (1, "new")):
        seen = [p[side] for p in pairs]
        if len(set(seen)) != len(seen):
            raise GpuMapError(f"annotation {GPU_MAP}: the same {what} GPU is named twice")
    return tuple(pairs)


def parse_visible(value: str) -> tuple[str, ...]:
    """NVIDIA_VISIBLE_DEVICES -> the container's GPUs; () for all/none/void/empty or any entry that is neither a
    UUID nor an index (MIG devices): no say. More than MAX_GPUS entries is an error."""
    value = value.strip()
    if value.lower() in ("", "all", "none", "void"):
        return ()
    items = [i.strip() for i in value.split(",") if i.strip()]
    if len(items) > MAX_GPUS:
        raise GpuMapError(f"{VISIBLE_DEVICES}: {len(items)} GPUs, more than {MAX_GPUS}")
    out: list[str] = []
    for item in items:
        if _is_uuid(item):
            out.append(_norm(item))
        elif _INDEX.fullmatch(item):
            out.append(str(int(item)))
        else:
            # MIG devices and other forms: not ours to remap. Every container has this variable, most are never
            # restored: it says nothing (hookd's own choice at a restore) rather than failing the Create.
            return ()
    return tuple(out)


def plan(manifest: GpuManifest | None, targets: GpuTargets,
         node_gpus: Mapping[int, str] | None = None) -> dict[str, str]:
    """old uuid -> new uuid for hookd. The annotation as given; else every checkpointed GPU that is not
    among the container's GPUs goes to one of the container's GPUs that no other checkpointed GPU keeps
    or takes, in the container's order. `node_gpus`: index -> uuid, needed when the list has indexes."""
    if targets.explicit:
        return dict(targets.explicit)
    if manifest is None or not manifest.gpus or not targets.visible:
        return {}
    mine: list[str] = []
    for v in targets.visible:
        if _is_uuid(v):
            mine.append(v)
        elif node_gpus is not None and int(v) in node_gpus:
            mine.append(_norm(node_gpus[int(v)]))
        else:
            raise GpuMapError(f"{VISIBLE_DEVICES} names GPU {v}, which this node's inventory does not list "
                              f"({len(node_gpus or {})} GPUs known); set annotation {GPU_MAP}")
    olds = [_norm(g.uuid) for g in manifest.gpus]
    free = [m for m in mine if m not in olds]
    out: dict[str, str] = {}
    for old in olds:
        if old in mine:
            continue
        if not free:
            raise GpuMapError(f"the checkpoint used {len(olds)} GPU(s) ({', '.join(olds)}); the container has "
                              f"{len(mine)} ({', '.join(mine)}): too few to restore onto")
        out[old] = free.pop(0)
    return out


def _is_uuid(text: str) -> bool:
    return _UUID.fullmatch(text) is not None


def _norm(uuid: str) -> str:
    """One spelling, as hookd's: `GPU-` and lower-case hex."""
    return "GPU-" + uuid[4:].lower() if uuid[:4].upper() == "GPU-" else uuid.lower()
