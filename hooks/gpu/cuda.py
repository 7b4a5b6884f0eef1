"""The CUDA driver's process-checkpoint API through ctypes: every signature in one place.

hookd loads libcuda once and calls cuInit(0) once, then stays resident: exec'ing a tool per step
costs a CUDA init each time. The caller needs no CUDA context of its own. ctypes releases the GIL
during each call, so driver calls on different processes run in parallel from threads (the steps
are CPU-bound per target process and scale across processes: FACTS, "Measured on the H100").

Behaviour measured on driver 580.159.04 (tests/fakes/fakegpu/README.md has the table):
- a live pid without CUDA answers CUDA_ERROR_NOT_INITIALIZED, a pid that does not exist
  CUDA_ERROR_OPERATING_SYSTEM, a wrong transition CUDA_ERROR_ILLEGAL_STATE;
- every call on a stopped or cgroup-frozen process blocks until it runs again, whatever timeoutMs
  says: check before calling (procfs.paused).

Every call here blocks: call them only through blocking.run_blocking.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Sequence
from typing import Any, Protocol

from kybernate.hooks.api.errors import DriverUnavailable

DEFAULT_LIBCUDA = "libcuda.so.1"


class CudaState(enum.IntEnum):
    """CUprocessState. CHECKPOINTING and RESTORING exist in newer drivers (13.4 headers) only."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5


# CUresult names for the codes the checkpoint API returns, used when cuGetErrorName itself fails.
ERROR_NAMES: dict[int, str] = {
    0: "CUDA_SUCCESS",
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    304: "CUDA_ERROR_OPERATING_SYSTEM",
    400: "CUDA_ERROR_INVALID_HANDLE",
    401: "CUDA_ERROR_ILLEGAL_STATE",
    500: "CUDA_ERROR_NOT_FOUND",
    800: "CUDA_ERROR_NOT_PERMITTED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    909: "CUDA_ERROR_TIMEOUT",
    999: "CUDA_ERROR_UNKNOWN",
}

# cuGetErrorString of driver 580.159.04 (measured): the cuda-checkpoint binary prints these in quotes.
ERROR_STRINGS: dict[str, str] = {
    "invalid argument": "CUDA_ERROR_INVALID_VALUE",
    "out of memory": "CUDA_ERROR_OUT_OF_MEMORY",
    "initialization error": "CUDA_ERROR_NOT_INITIALIZED",
    "driver shutting down": "CUDA_ERROR_DEINITIALIZED",
    "no CUDA-capable device is detected": "CUDA_ERROR_NO_DEVICE",
    "invalid device ordinal": "CUDA_ERROR_INVALID_DEVICE",
    "OS call failed or operation not supported on this OS": "CUDA_ERROR_OPERATING_SYSTEM",
    "invalid resource handle": "CUDA_ERROR_INVALID_HANDLE",
    "the operation cannot be performed in the present state": "CUDA_ERROR_ILLEGAL_STATE",
    "named symbol not found": "CUDA_ERROR_NOT_FOUND",
    "operation not permitted": "CUDA_ERROR_NOT_PERMITTED",
    "operation not supported": "CUDA_ERROR_NOT_SUPPORTED",
    "wait operation timed out": "CUDA_ERROR_TIMEOUT",
    "unknown error": "CUDA_ERROR_UNKNOWN",
}
ERROR_CODES: dict[str, int] = {name: code for code, name in ERROR_NAMES.items()}

# Answers that mean "this pid holds no CUDA state" (measured): not a CUDA process, or no such process.
NOT_A_CUDA_PROCESS = frozenset({"CUDA_ERROR_NOT_INITIALIZED", "CUDA_ERROR_OPERATING_SYSTEM"})


class CudaError(Exception):
    """A driver call failed. `name` is the driver's own name for the CUresult (CUDA_ERROR_TIMEOUT)."""

    def __init__(self, call: str, code: int, name: str, pid: int | None = None, detail: str = "") -> None:
        where = f" on pid {pid}" if pid is not None else ""
        super().__init__(f"{call}{where} failed: {name} ({code}){': ' + detail if detail else ''}")
        self.call = call
        self.code = code
        self.name = name
        self.pid = pid
        self.detail = detail


# ---- UUIDs: NVML writes "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", the driver takes 16 raw bytes ----

def uuid_bytes(uuid: str) -> bytes:
    text = uuid[4:] if uuid.startswith(("GPU-", "MIG-")) else uuid
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"{uuid!r} is not a GPU UUID (want GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    return raw


def uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def normalize_uuid(uuid: str) -> str:
    """One spelling per GPU, so UUIDs from NVML, manifests and users compare equal."""
    return uuid_text(uuid_bytes(uuid))


class CheckpointDriver(Protocol):
    """What GpuManager needs from a driver backend. Every method blocks; errors are CudaError."""

    @property
    def backend(self) -> str: ...

    @property
    def cuda_version(self) -> int: ...

    def get_state(self, pid: int) -> CudaState: ...

    def lock(self, pid: int, timeout_ms: int) -> None: ...

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int, pairs: Sequence[tuple[str, str]] = ()) -> None: ...

    def unlock(self, pid: int) -> None: ...

    def restore_thread_id(self, pid: int) -> int: ...

    def close(self) -> None: ...


# ---- cuda.h structures (driver 570+; all args structs are 64 bytes, reserved fields zero) ----------

class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class CUcheckpointCheckpointArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUcheckpointGpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    # Later headers name bytes 12..15 padding0 and 16..23 customStorageInfo_out; zero means "from host".
    _fields_ = [
        ("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * 44),
        ("reserved1", ctypes.c_uint64),
    ]


class CUcheckpointUnlockArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


for _struct in (CUcheckpointLockArgs, CUcheckpointCheckpointArgs, CUcheckpointRestoreArgs, CUcheckpointUnlockArgs):
    assert ctypes.sizeof(_struct) == 64, _struct.__name__
assert ctypes.sizeof(CUcheckpointGpuPair) == 32

_P = ctypes.POINTER
_INT = ctypes.c_int  # CUresult, CUdevice and CUprocessState are all C ints

# name -> (argtypes, required). Optional symbols may be absent from older drivers.
SIGNATURES: dict[str, tuple[list[Any], bool]] = {
    "cuInit": ([ctypes.c_uint], True),
    "cuDriverGetVersion": ([_P(_INT)], True),
    "cuGetErrorName": ([_INT, _P(ctypes.c_char_p)], True),
    "cuGetErrorString": ([_INT, _P(ctypes.c_char_p)], False),
    "cuDeviceGetCount": ([_P(_INT)], True),
    "cuDeviceGet": ([_P(_INT), _INT], True),
    "cuDeviceGetUuid_v2": ([_P(CUuuid), _INT], False),
    "cuDeviceGetUuid": ([_P(CUuuid), _INT], False),
    "cuDeviceGetName": ([ctypes.c_char_p, _INT, _INT], True),
    "cuCheckpointProcessGetState": ([_INT, _P(_INT)], True),
    "cuCheckpointProcessGetRestoreThreadId": ([_INT, _P(_INT)], True),
    "cuCheckpointProcessLock": ([_INT, _P(CUcheckpointLockArgs)], True),
    "cuCheckpointProcessCheckpoint": ([_INT, _P(CUcheckpointCheckpointArgs)], True),
    "cuCheckpointProcessRestore": ([_INT, _P(CUcheckpointRestoreArgs)], True),
    "cuCheckpointProcessUnlock": ([_INT, _P(CUcheckpointUnlockArgs)], True),
}


class CudaDriver:
    """The ctypes backend: libcuda loaded and initialised once, for the life of the daemon."""

    def __init__(self, library: str = DEFAULT_LIBCUDA) -> None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as err:
            raise DriverUnavailable(
                f"cannot load the CUDA driver library {library!r}: {err}; install the NVIDIA driver or pass "
                "--libcuda with its path (e.g. /usr/local/nvidia/lib64/libcuda.so.1)"
            ) from err
        self._fns: dict[str, Any] = {}
        for name, (argtypes, required) in SIGNATURES.items():
            fn = getattr(lib, name, None)
            if fn is None:
                if required:
                    raise DriverUnavailable(
                        f"{library} has no {name}: the process checkpoint API needs NVIDIA driver 570 or newer"
                    )
                continue
            fn.argtypes = argtypes
            fn.restype = _INT
            self._fns[name] = fn
        if "cuDeviceGetUuid_v2" not in self._fns and "cuDeviceGetUuid" not in self._fns:
            raise DriverUnavailable(f"{library} has neither cuDeviceGetUuid_v2 nor cuDeviceGetUuid")
        self.library = library
        self._lib = lib  # keeps the library mapped for as long as the driver object lives
        rc = self._fns["cuInit"](0)
        if rc != 0:
            raise DriverUnavailable(f"cuInit(0) failed: {self.error_name(rc)} ({rc}): no usable GPU on this node?")
        version = _INT()
        self.check(self._fns["cuDriverGetVersion"](ctypes.byref(version)), "cuDriverGetVersion")
        self._cuda_version = version.value

    @property
    def backend(self) -> str:
        return "ctypes"

    @property
    def cuda_version(self) -> int:
        return self._cuda_version

    def error_name(self, rc: int) -> str:
        out = ctypes.c_char_p()
        if self._fns["cuGetErrorName"](rc, ctypes.byref(out)) == 0 and out.value:
            return out.value.decode()
        return ERROR_NAMES.get(rc, f"CUresult {rc}")

    def check(self, rc: int, call: str, pid: int | None = None) -> None:
        """Raise CudaError carrying the driver's own name for a non-zero CUresult."""
        if rc != 0:
            raise CudaError(call, rc, self.error_name(rc), pid)

    def get_state(self, pid: int) -> CudaState:
        state = _INT(-1)
        self.check(self._fns["cuCheckpointProcessGetState"](pid, ctypes.byref(state)),
                   "cuCheckpointProcessGetState", pid)
        try:
            return CudaState(state.value)
        except ValueError:
            raise CudaError("cuCheckpointProcessGetState", 0, "UNKNOWN_STATE", pid, f"state {state.value}") from None

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = CUcheckpointLockArgs(timeoutMs=timeout_ms)
        self.check(self._fns["cuCheckpointProcessLock"](pid, ctypes.byref(args)), "cuCheckpointProcessLock", pid)

    def checkpoint(self, pid: int) -> None:
        self.check(self._fns["cuCheckpointProcessCheckpoint"](pid, None), "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int, pairs: Sequence[tuple[str, str]] = ()) -> None:
        if not pairs:
            self.check(self._fns["cuCheckpointProcessRestore"](pid, None), "cuCheckpointProcessRestore", pid)
            return
        array = (CUcheckpointGpuPair * len(pairs))()
        for i, (old, new) in enumerate(pairs):
            array[i].oldUuid.bytes[:] = uuid_bytes(old)
            array[i].newUuid.bytes[:] = uuid_bytes(new)
        args = CUcheckpointRestoreArgs(
            gpuPairs=ctypes.cast(array, ctypes.POINTER(CUcheckpointGpuPair)), gpuPairsCount=len(pairs)
        )
        # `array` stays referenced until the call returns: the driver reads it during the call only.
        self.check(self._fns["cuCheckpointProcessRestore"](pid, ctypes.byref(args)), "cuCheckpointProcessRestore", pid)

    def unlock(self, pid: int) -> None:
        self.check(self._fns["cuCheckpointProcessUnlock"](pid, None), "cuCheckpointProcessUnlock", pid)

    def restore_thread_id(self, pid: int) -> int:
        tid = _INT(0)
        self.check(self._fns["cuCheckpointProcessGetRestoreThreadId"](pid, ctypes.byref(tid)),
                   "cuCheckpointProcessGetRestoreThreadId", pid)
        return tid.value

    def device_uuids(self) -> list[str]:
        """The GPUs this process sees, in CUDA order (diagnostics; NVML is the inventory)."""
        count = _INT()
        self.check(self._fns["cuDeviceGetCount"](ctypes.byref(count)), "cuDeviceGetCount")
        get_uuid = self._fns.get("cuDeviceGetUuid_v2") or self._fns["cuDeviceGetUuid"]
        out = []
        for ordinal in range(count.value):
            dev = _INT()
            self.check(self._fns["cuDeviceGet"](ctypes.byref(dev), ordinal), "cuDeviceGet")
            raw = CUuuid()
            self.check(get_uuid(ctypes.byref(raw), dev), "cuDeviceGetUuid")
            out.append(uuid_text(bytes(raw.bytes)))
        return out

    def close(self) -> None:
        """Nothing to release: the driver has no teardown call, and the library stays mapped."""
