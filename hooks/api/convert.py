"""Protobuf messages <-> the plain dataclasses of model.py, in one place for the service and the client.

CudaState in the proto is CUprocessState + 1 (proto3 wants 0 to mean "unset").
"""

from __future__ import annotations

from kybernate.api import hookd_pb2 as pb

from .model import (
    CheckpointResult,
    GpuDeviceRecord,
    GpuManifest,
    GpuPair,
    GpuProcessRecord,
    HealthInfo,
    InheritedDrop,
    NodeGpu,
    ProcessOutcome,
    ProcessStatus,
    RestoreResult,
    StepTiming,
)

_STATES = ("RUNNING", "LOCKED", "CHECKPOINTED", "FAILED", "CHECKPOINTING", "RESTORING")


def state_to_pb(name: str) -> int:
    return _STATES.index(name) + 1 if name in _STATES else 0


def state_from_pb(value: int) -> str:
    return _STATES[value - 1] if 0 < value <= len(_STATES) else ""


def manifest_to_pb(m: GpuManifest) -> pb.GpuManifest:
    return pb.GpuManifest(
        driver_version=m.driver_version,
        created_at=m.created_at,
        gpus=[pb.GpuDevice(uuid=g.uuid, name=g.name, index=g.index, vram_used_bytes=g.vram_used_bytes) for g in m.gpus],
        processes=[pb.GpuProcess(pid=p.pid, state=state_to_pb(p.state), gpu_uuids=list(p.gpu_uuids),  # type: ignore[arg-type]
                                 vram_bytes=p.vram_bytes) for p in m.processes],
        dropped_inherited=[pb.InheritedDrop(pid=d.pid, comm=d.comm, parent_pid=d.parent_pid, mappings=list(d.mappings),
                                            fds=list(d.fds)) for d in m.dropped_inherited],
    )


def manifest_from_pb(m: pb.GpuManifest) -> GpuManifest:
    return GpuManifest(
        driver_version=m.driver_version,
        created_at=m.created_at,
        gpus=tuple(GpuDeviceRecord(g.uuid, g.name, g.index, g.vram_used_bytes) for g in m.gpus),
        processes=tuple(GpuProcessRecord(p.pid, state_from_pb(p.state), tuple(p.gpu_uuids), p.vram_bytes)
                        for p in m.processes),
        dropped_inherited=tuple(InheritedDrop(d.pid, d.comm, d.parent_pid, tuple(d.mappings), tuple(d.fds))
                                for d in m.dropped_inherited),
    )


def outcome_to_pb(o: ProcessOutcome) -> pb.ProcessResult:
    return pb.ProcessResult(pid=o.pid, state_before=state_to_pb(o.state_before),  # type: ignore[arg-type]
                            state_after=state_to_pb(o.state_after),  # type: ignore[arg-type]
                            steps=[pb.StepTiming(step=s.step, seconds=s.seconds) for s in o.steps])


def outcome_from_pb(o: pb.ProcessResult) -> ProcessOutcome:
    return ProcessOutcome(o.pid, state_from_pb(o.state_before), state_from_pb(o.state_after),
                          tuple(StepTiming(s.step, s.seconds) for s in o.steps))


def checkpoint_to_pb(r: CheckpointResult) -> pb.CheckpointGpuResponse:
    return pb.CheckpointGpuResponse(manifest=manifest_to_pb(r.manifest),
                                    processes=[outcome_to_pb(o) for o in r.processes])


def checkpoint_from_pb(r: pb.CheckpointGpuResponse) -> CheckpointResult:
    return CheckpointResult(manifest_from_pb(r.manifest), tuple(outcome_from_pb(o) for o in r.processes))


def restore_to_pb(r: RestoreResult) -> pb.RestoreGpuResponse:
    return pb.RestoreGpuResponse(processes=[outcome_to_pb(o) for o in r.processes],
                                 pairs=[pb.GpuPair(old_uuid=p.old_uuid, new_uuid=p.new_uuid) for p in r.pairs],
                                 remapped=r.remapped)


def restore_from_pb(r: pb.RestoreGpuResponse) -> RestoreResult:
    return RestoreResult(tuple(outcome_from_pb(o) for o in r.processes),
                         tuple(GpuPair(p.old_uuid, p.new_uuid) for p in r.pairs), r.remapped)


def status_to_pb(items: list[ProcessStatus]) -> pb.GpuStatusResponse:
    return pb.GpuStatusResponse(processes=[
        pb.ProcessState(pid=s.pid, state=state_to_pb(s.state), gpu_uuids=list(s.gpu_uuids),  # type: ignore[arg-type]
                        vram_bytes=s.vram_bytes, note=s.note) for s in items])


def status_from_pb(r: pb.GpuStatusResponse) -> list[ProcessStatus]:
    return [ProcessStatus(s.pid, state_from_pb(s.state), tuple(s.gpu_uuids), s.vram_bytes, s.note) for s in r.processes]


def health_to_pb(h: HealthInfo) -> pb.HealthResponse:
    return pb.HealthResponse(
        driver_version=h.driver_version, backend=h.backend, cuda_version=h.cuda_version, nvml=h.nvml,
        gpus=[pb.NodeGpu(uuid=g.uuid, name=g.name, index=g.index, minor=g.minor,
                         memory_total_bytes=g.memory_total_bytes, memory_free_bytes=g.memory_free_bytes)
              for g in h.gpus],
    )


def health_from_pb(r: pb.HealthResponse) -> HealthInfo:
    return HealthInfo(r.driver_version, r.backend, r.cuda_version, r.nvml,
                      tuple(NodeGpu(g.uuid, g.name, g.index, g.minor, g.memory_total_bytes, g.memory_free_bytes)
                            for g in r.gpus))
