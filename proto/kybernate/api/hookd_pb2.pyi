from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CudaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CUDA_STATE_UNSPECIFIED: _ClassVar[CudaState]
    CUDA_STATE_RUNNING: _ClassVar[CudaState]
    CUDA_STATE_LOCKED: _ClassVar[CudaState]
    CUDA_STATE_CHECKPOINTED: _ClassVar[CudaState]
    CUDA_STATE_FAILED: _ClassVar[CudaState]
    CUDA_STATE_CHECKPOINTING: _ClassVar[CudaState]
    CUDA_STATE_RESTORING: _ClassVar[CudaState]
CUDA_STATE_UNSPECIFIED: CudaState
CUDA_STATE_RUNNING: CudaState
CUDA_STATE_LOCKED: CudaState
CUDA_STATE_CHECKPOINTED: CudaState
CUDA_STATE_FAILED: CudaState
CUDA_STATE_CHECKPOINTING: CudaState
CUDA_STATE_RESTORING: CudaState

class ContainerRef(_message.Message):
    __slots__ = ("namespace", "container_id", "pids", "cgroup_path")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    PIDS_FIELD_NUMBER: _ClassVar[int]
    CGROUP_PATH_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    container_id: str
    pids: _containers.RepeatedScalarFieldContainer[int]
    cgroup_path: str
    def __init__(self, namespace: _Optional[str] = ..., container_id: _Optional[str] = ..., pids: _Optional[_Iterable[int]] = ..., cgroup_path: _Optional[str] = ...) -> None: ...

class GpuDevice(_message.Message):
    __slots__ = ("uuid", "name", "index", "vram_used_bytes")
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VRAM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    name: str
    index: int
    vram_used_bytes: int
    def __init__(self, uuid: _Optional[str] = ..., name: _Optional[str] = ..., index: _Optional[int] = ..., vram_used_bytes: _Optional[int] = ...) -> None: ...

class GpuProcess(_message.Message):
    __slots__ = ("pid", "state", "gpu_uuids", "vram_bytes")
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    pid: int
    state: CudaState
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    vram_bytes: int
    def __init__(self, pid: _Optional[int] = ..., state: _Optional[_Union[CudaState, str]] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., vram_bytes: _Optional[int] = ...) -> None: ...

class InheritedDrop(_message.Message):
    __slots__ = ("pid", "comm", "parent_pid", "mappings", "fds")
    PID_FIELD_NUMBER: _ClassVar[int]
    COMM_FIELD_NUMBER: _ClassVar[int]
    PARENT_PID_FIELD_NUMBER: _ClassVar[int]
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    FDS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    comm: str
    parent_pid: int
    mappings: _containers.RepeatedScalarFieldContainer[str]
    fds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pid: _Optional[int] = ..., comm: _Optional[str] = ..., parent_pid: _Optional[int] = ..., mappings: _Optional[_Iterable[str]] = ..., fds: _Optional[_Iterable[str]] = ...) -> None: ...

class GpuManifest(_message.Message):
    __slots__ = ("driver_version", "gpus", "processes", "created_at", "dropped_inherited")
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_INHERITED_FIELD_NUMBER: _ClassVar[int]
    driver_version: str
    gpus: _containers.RepeatedCompositeFieldContainer[GpuDevice]
    processes: _containers.RepeatedCompositeFieldContainer[GpuProcess]
    created_at: str
    dropped_inherited: _containers.RepeatedCompositeFieldContainer[InheritedDrop]
    def __init__(self, driver_version: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[GpuDevice, _Mapping]]] = ..., processes: _Optional[_Iterable[_Union[GpuProcess, _Mapping]]] = ..., created_at: _Optional[str] = ..., dropped_inherited: _Optional[_Iterable[_Union[InheritedDrop, _Mapping]]] = ...) -> None: ...

class StepTiming(_message.Message):
    __slots__ = ("step", "seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: str
    seconds: float
    def __init__(self, step: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class ProcessResult(_message.Message):
    __slots__ = ("pid", "state_before", "state_after", "steps")
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    STATE_AFTER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    pid: int
    state_before: CudaState
    state_after: CudaState
    steps: _containers.RepeatedCompositeFieldContainer[StepTiming]
    def __init__(self, pid: _Optional[int] = ..., state_before: _Optional[_Union[CudaState, str]] = ..., state_after: _Optional[_Union[CudaState, str]] = ..., steps: _Optional[_Iterable[_Union[StepTiming, _Mapping]]] = ...) -> None: ...

class GpuPair(_message.Message):
    __slots__ = ("old_uuid", "new_uuid")
    OLD_UUID_FIELD_NUMBER: _ClassVar[int]
    NEW_UUID_FIELD_NUMBER: _ClassVar[int]
    old_uuid: str
    new_uuid: str
    def __init__(self, old_uuid: _Optional[str] = ..., new_uuid: _Optional[str] = ...) -> None: ...

class CheckpointGpuRequest(_message.Message):
    __slots__ = ("container", "lock_timeout_ms")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    LOCK_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    container: ContainerRef
    lock_timeout_ms: int
    def __init__(self, container: _Optional[_Union[ContainerRef, _Mapping]] = ..., lock_timeout_ms: _Optional[int] = ...) -> None: ...

class CheckpointGpuResponse(_message.Message):
    __slots__ = ("manifest", "processes")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    manifest: GpuManifest
    processes: _containers.RepeatedCompositeFieldContainer[ProcessResult]
    def __init__(self, manifest: _Optional[_Union[GpuManifest, _Mapping]] = ..., processes: _Optional[_Iterable[_Union[ProcessResult, _Mapping]]] = ...) -> None: ...

class RestoreGpuRequest(_message.Message):
    __slots__ = ("container", "manifest", "gpu_map")
    class GpuMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    GPU_MAP_FIELD_NUMBER: _ClassVar[int]
    container: ContainerRef
    manifest: GpuManifest
    gpu_map: _containers.ScalarMap[str, str]
    def __init__(self, container: _Optional[_Union[ContainerRef, _Mapping]] = ..., manifest: _Optional[_Union[GpuManifest, _Mapping]] = ..., gpu_map: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RestoreGpuResponse(_message.Message):
    __slots__ = ("processes", "pairs", "remapped")
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessResult]
    pairs: _containers.RepeatedCompositeFieldContainer[GpuPair]
    remapped: bool
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessResult, _Mapping]]] = ..., pairs: _Optional[_Iterable[_Union[GpuPair, _Mapping]]] = ..., remapped: _Optional[bool] = ...) -> None: ...

class GpuStatusRequest(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: ContainerRef
    def __init__(self, container: _Optional[_Union[ContainerRef, _Mapping]] = ...) -> None: ...

class ProcessState(_message.Message):
    __slots__ = ("pid", "state", "gpu_uuids", "vram_bytes", "note")
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    pid: int
    state: CudaState
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    vram_bytes: int
    note: str
    def __init__(self, pid: _Optional[int] = ..., state: _Optional[_Union[CudaState, str]] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., vram_bytes: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class GpuStatusResponse(_message.Message):
    __slots__ = ("processes",)
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessState]
    def __init__(self, processes: _Optional[_Iterable[_Union[ProcessState, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeGpu(_message.Message):
    __slots__ = ("uuid", "name", "index", "minor", "memory_total_bytes", "memory_free_bytes")
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MINOR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    name: str
    index: int
    minor: int
    memory_total_bytes: int
    memory_free_bytes: int
    def __init__(self, uuid: _Optional[str] = ..., name: _Optional[str] = ..., index: _Optional[int] = ..., minor: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("driver_version", "backend", "gpus", "cuda_version", "nvml")
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    NVML_FIELD_NUMBER: _ClassVar[int]
    driver_version: str
    backend: str
    gpus: _containers.RepeatedCompositeFieldContainer[NodeGpu]
    cuda_version: int
    nvml: bool
    def __init__(self, driver_version: _Optional[str] = ..., backend: _Optional[str] = ..., gpus: _Optional[_Iterable[_Union[NodeGpu, _Mapping]]] = ..., cuda_version: _Optional[int] = ..., nvml: _Optional[bool] = ...) -> None: ...
