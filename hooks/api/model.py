"""The plain data that crosses hookd's boundaries: the GPU manifest and the results of each call.

Standard library only, so that the shim (which writes the manifest into checkpoint directories as
`kybernate.json`) imports it in microseconds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MANIFEST_FORMAT_VERSION = 1
MANIFEST_KIND = "kybernate.io/gpu-manifest"


class ManifestError(ValueError):
    """A kybernate.json that this version cannot read."""


@dataclass(frozen=True, slots=True)
class GpuDeviceRecord:
    """A GPU the container used at checkpoint time."""

    uuid: str  # "GPU-…" as NVML spells it
    name: str  # model; a remap target must be the same model
    index: int  # NVML index on the node that took the checkpoint
    vram_used_bytes: int  # held by the container's processes on it: a restore needs this much free


@dataclass(frozen=True, slots=True)
class GpuProcessRecord:
    pid: int  # host pid at checkpoint time (a CRIU restore gives the process a new one)
    state: str  # CUprocessState name after the checkpoint: CHECKPOINTED
    gpu_uuids: tuple[str, ...] = ()
    vram_bytes: int = 0


@dataclass(frozen=True, slots=True)
class InheritedDrop:
    """GPU device files a forked child had inherited from a CUDA process, dropped before the dump."""

    pid: int  # host pid of the child at checkpoint time
    comm: str
    parent_pid: int  # the CUDA process it descends from
    mappings: tuple[str, ...] = ()  # "200600000-200800000 rw-s /dev/nvidia0", as /proc/<pid>/maps had them
    fds: tuple[str, ...] = ()  # "5 /dev/nvidiactl": descriptor number and path


@dataclass(frozen=True, slots=True)
class GpuManifest:
    """What a GPU checkpoint moved and from where. Serialized as kybernate.json in checkpoint images."""

    driver_version: str = ""
    gpus: tuple[GpuDeviceRecord, ...] = ()
    processes: tuple[GpuProcessRecord, ...] = ()
    created_at: str = ""  # RFC 3339, UTC
    format_version: int = MANIFEST_FORMAT_VERSION
    # Forked children's inherited GPU device files dropped by this checkpoint: nothing to restore
    # (the children never used them), recorded so that a crash of a child can be traced back.
    dropped_inherited: tuple[InheritedDrop, ...] = ()

    @property
    def empty(self) -> bool:
        """True for a container without CUDA processes: nothing to restore."""
        return not self.processes

    @property
    def vram_bytes(self) -> int:
        return sum(g.vram_used_bytes for g in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": MANIFEST_KIND,
            "format_version": self.format_version,
            "driver_version": self.driver_version,
            "created_at": self.created_at,
            "gpus": [
                {"uuid": g.uuid, "name": g.name, "index": g.index, "vram_used_bytes": g.vram_used_bytes}
                for g in self.gpus
            ],
            "processes": [
                {"pid": p.pid, "state": p.state, "gpu_uuids": list(p.gpu_uuids), "vram_bytes": p.vram_bytes}
                for p in self.processes
            ],
            "dropped_inherited": [
                {"pid": d.pid, "comm": d.comm, "parent_pid": d.parent_pid, "mappings": list(d.mappings),
                 "fds": list(d.fds)}
                for d in self.dropped_inherited
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuManifest:
        try:
            version = int(data.get("format_version", MANIFEST_FORMAT_VERSION))
            if version > MANIFEST_FORMAT_VERSION:
                raise ManifestError(
                    f"GPU manifest format {version} is newer than this Kybernate reads "
                    f"({MANIFEST_FORMAT_VERSION}): upgrade Kybernate on this node"
                )
            return cls(
                driver_version=str(data.get("driver_version", "")),
                created_at=str(data.get("created_at", "")),
                format_version=version,
                gpus=tuple(
                    GpuDeviceRecord(str(g["uuid"]), str(g.get("name", "")), int(g.get("index", 0)),
                                    int(g.get("vram_used_bytes", 0)))
                    for g in data.get("gpus") or ()
                ),
                processes=tuple(
                    GpuProcessRecord(int(p["pid"]), str(p.get("state", "")),
                                     tuple(str(u) for u in p.get("gpu_uuids") or ()), int(p.get("vram_bytes", 0)))
                    for p in data.get("processes") or ()
                ),
                dropped_inherited=tuple(
                    InheritedDrop(int(d["pid"]), str(d.get("comm", "")), int(d.get("parent_pid", 0)),
                                  tuple(str(m) for m in d.get("mappings") or ()),
                                  tuple(str(f) for f in d.get("fds") or ()))
                    for d in data.get("dropped_inherited") or ()
                ),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ManifestError(f"GPU manifest is malformed: {err!r}") from err

    @classmethod
    def from_json(cls, text: str) -> GpuManifest:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ManifestError(f"GPU manifest is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ManifestError("GPU manifest is not a JSON object")
        return cls.from_dict(data)


@dataclass(frozen=True, slots=True)
class StepTiming:
    step: str  # lock | checkpoint | restore | unlock
    seconds: float


@dataclass(frozen=True, slots=True)
class ProcessOutcome:
    """What one call did to one process."""

    pid: int
    state_before: str
    state_after: str
    steps: tuple[StepTiming, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuPair:
    old_uuid: str
    new_uuid: str


@dataclass(frozen=True, slots=True)
class CheckpointResult:
    manifest: GpuManifest
    processes: tuple[ProcessOutcome, ...] = ()


@dataclass(frozen=True, slots=True)
class RestoreResult:
    processes: tuple[ProcessOutcome, ...] = ()
    pairs: tuple[GpuPair, ...] = ()
    remapped: bool = False  # some pair changes GPU, so the pairs were passed to the driver


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    pid: int
    state: str  # CUprocessState name, or "" when it cannot be known now (see note)
    gpu_uuids: tuple[str, ...] = ()
    vram_bytes: int = 0
    note: str = ""


@dataclass(frozen=True, slots=True)
class NodeGpu:
    uuid: str
    name: str
    index: int
    minor: int
    memory_total_bytes: int
    memory_free_bytes: int


@dataclass(frozen=True, slots=True)
class HealthInfo:
    driver_version: str
    backend: str
    cuda_version: int
    nvml: bool
    gpus: tuple[NodeGpu, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class StoreProgress:
    """One progress message of a store checkpoint: the phase and, where known, bytes."""
    phase: str
    bytes_done: int = 0
    bytes_total: int = 0


@dataclass(frozen=True, slots=True)
class StoreCheckpointResult:
    """A committed store generation (hookd's Store.Checkpoint)."""
    key: str
    generation: int
    path: str
    size_bytes: int
    pause_s: float
    total_s: float
    phase_s: dict[str, float]
    upload_queued: bool


@dataclass(frozen=True, slots=True)
class RoomMade:
    """hookd's Standby.MakeRoom: the workloads the arbiter parked so that a starting container's VRAM fits."""
    victims: tuple[str, ...]
    reason: str
