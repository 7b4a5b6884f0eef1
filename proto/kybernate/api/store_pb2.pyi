from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckpointRequest(_message.Message):
    __slots__ = ("namespace", "container_id", "key", "leave_running", "deadline_ms", "reason")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LEAVE_RUNNING_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    container_id: str
    key: str
    leave_running: bool
    deadline_ms: int
    reason: str
    def __init__(self, namespace: _Optional[str] = ..., container_id: _Optional[str] = ..., key: _Optional[str] = ..., leave_running: _Optional[bool] = ..., deadline_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckpointProgress(_message.Message):
    __slots__ = ("phase", "bytes_done", "bytes_total", "result")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    phase: str
    bytes_done: int
    bytes_total: int
    result: CheckpointResult
    def __init__(self, phase: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., result: _Optional[_Union[CheckpointResult, _Mapping]] = ...) -> None: ...

class CheckpointResult(_message.Message):
    __slots__ = ("key", "generation", "path", "size_bytes", "pause_s", "total_s", "phase_s", "upload_queued")
    class PhaseSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    PHASE_S_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_QUEUED_FIELD_NUMBER: _ClassVar[int]
    key: str
    generation: int
    path: str
    size_bytes: int
    pause_s: float
    total_s: float
    phase_s: _containers.ScalarMap[str, float]
    upload_queued: bool
    def __init__(self, key: _Optional[str] = ..., generation: _Optional[int] = ..., path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., pause_s: _Optional[float] = ..., total_s: _Optional[float] = ..., phase_s: _Optional[_Mapping[str, float]] = ..., upload_queued: _Optional[bool] = ...) -> None: ...
