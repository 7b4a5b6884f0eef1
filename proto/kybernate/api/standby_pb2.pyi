from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("workloads",)
    WORKLOADS_FIELD_NUMBER: _ClassVar[int]
    workloads: _containers.RepeatedCompositeFieldContainer[WorkloadStatus]
    def __init__(self, workloads: _Optional[_Iterable[_Union[WorkloadStatus, _Mapping]]] = ...) -> None: ...

class ParkRequest(_message.Message):
    __slots__ = ("name", "reason", "tier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    tier: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class WakeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Listener(_message.Message):
    __slots__ = ("port", "pending")
    PORT_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    port: int
    pending: int
    def __init__(self, port: _Optional[int] = ..., pending: _Optional[int] = ...) -> None: ...

class WorkloadStatus(_message.Message):
    __slots__ = ("namespace", "container_id", "state", "tier", "opted_in", "policy_error", "idle_for_s", "idle_period_s", "wake", "priority", "vram_bytes", "gpus", "host_ram_bytes", "last_park_s", "last_wake_s", "parked_by", "reason", "signals", "listeners", "last_error", "woken_by", "parks")
    class SignalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    OPTED_IN_FIELD_NUMBER: _ClassVar[int]
    POLICY_ERROR_FIELD_NUMBER: _ClassVar[int]
    IDLE_FOR_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_PERIOD_S_FIELD_NUMBER: _ClassVar[int]
    WAKE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    VRAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    HOST_RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_PARK_S_FIELD_NUMBER: _ClassVar[int]
    LAST_WAKE_S_FIELD_NUMBER: _ClassVar[int]
    PARKED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    LISTENERS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    WOKEN_BY_FIELD_NUMBER: _ClassVar[int]
    PARKS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    container_id: str
    state: str
    tier: str
    opted_in: bool
    policy_error: str
    idle_for_s: float
    idle_period_s: float
    wake: str
    priority: int
    vram_bytes: int
    gpus: _containers.RepeatedScalarFieldContainer[str]
    host_ram_bytes: int
    last_park_s: float
    last_wake_s: float
    parked_by: str
    reason: str
    signals: _containers.ScalarMap[str, str]
    listeners: _containers.RepeatedCompositeFieldContainer[Listener]
    last_error: str
    woken_by: str
    parks: int
    def __init__(self, namespace: _Optional[str] = ..., container_id: _Optional[str] = ..., state: _Optional[str] = ..., tier: _Optional[str] = ..., opted_in: _Optional[bool] = ..., policy_error: _Optional[str] = ..., idle_for_s: _Optional[float] = ..., idle_period_s: _Optional[float] = ..., wake: _Optional[str] = ..., priority: _Optional[int] = ..., vram_bytes: _Optional[int] = ..., gpus: _Optional[_Iterable[str]] = ..., host_ram_bytes: _Optional[int] = ..., last_park_s: _Optional[float] = ..., last_wake_s: _Optional[float] = ..., parked_by: _Optional[str] = ..., reason: _Optional[str] = ..., signals: _Optional[_Mapping[str, str]] = ..., listeners: _Optional[_Iterable[_Union[Listener, _Mapping]]] = ..., last_error: _Optional[str] = ..., woken_by: _Optional[str] = ..., parks: _Optional[int] = ...) -> None: ...

class GpuNeed(_message.Message):
    __slots__ = ("gpu", "bytes")
    GPU_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    gpu: str
    bytes: int
    def __init__(self, gpu: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class MakeRoomRequest(_message.Message):
    __slots__ = ("namespace", "container_id", "bundle", "needs", "why")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    container_id: str
    bundle: str
    needs: _containers.RepeatedCompositeFieldContainer[GpuNeed]
    why: str
    def __init__(self, namespace: _Optional[str] = ..., container_id: _Optional[str] = ..., bundle: _Optional[str] = ..., needs: _Optional[_Iterable[_Union[GpuNeed, _Mapping]]] = ..., why: _Optional[str] = ...) -> None: ...

class MakeRoomResponse(_message.Message):
    __slots__ = ("victims", "reason")
    VICTIMS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    victims: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, victims: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...
