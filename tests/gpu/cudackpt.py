"""Minimal ctypes binding of the CUDA driver's process checkpoint API, for the GPU test scripts.

This is test tooling, not the product: kybernate-hookd has its own driver layer. It is kept here so
that the raw floors can be measured on a GPU machine without anything else of Kybernate.

Call shapes (driver 580 / CUDA 13.0 cuda.h): every call takes (int pid, <Args>*) and returns a
CUresult; the args structs are 64 bytes, reserved fields zero, and NULL is accepted.
cuInit(0) must come first; the calling process needs no CUDA context of its own.
"""

from __future__ import annotations

import ctypes
import os
import time

STATES = {0: "RUNNING", 1: "LOCKED", 2: "CHECKPOINTED", 3: "FAILED"}


class LockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint32), ("reserved0", ctypes.c_uint32),
                ("reserved1", ctypes.c_uint64 * 7)]


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]

    def hex(self) -> str:
        return bytes(self.bytes).hex()


class GpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class RestoreArgs(ctypes.Structure):
    _fields_ = [("gpuPairs", ctypes.POINTER(GpuPair)), ("gpuPairsCount", ctypes.c_uint32),
                ("reserved", ctypes.c_char * 44), ("reserved1", ctypes.c_uint64)]


assert ctypes.sizeof(LockArgs) == 64 and ctypes.sizeof(RestoreArgs) == 64


class CudaError(RuntimeError):
    def __init__(self, call: str, code: int, name: str) -> None:
        super().__init__(f"{call} failed: {name} ({code})")
        self.call, self.code, self.name = call, code, name


def _candidates() -> list[str]:
    out = []
    if os.environ.get("KYB_LIBCUDA"):
        out.append(os.environ["KYB_LIBCUDA"])
    out += ["/usr/local/nvidia/lib64/libcuda.so.1", "libcuda.so.1", "libcuda.so"]
    return out


class Driver:
    """Resident driver handle: load libcuda once, cuInit(0) once, then time each step."""

    def __init__(self) -> None:
        last: Exception | None = None
        for name in _candidates():
            try:
                self.lib = ctypes.CDLL(name)
                self.path = name
                break
            except OSError as e:
                last = e
        else:
            raise OSError(f"libcuda not found: {last}")
        lib = self.lib
        for fn in ("cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                   "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"):
            getattr(lib, fn).argtypes = [ctypes.c_int, ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_int
        lib.cuCheckpointProcessGetState.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.cuCheckpointProcessGetState.restype = ctypes.c_int
        lib.cuCheckpointProcessGetRestoreThreadId.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.cuCheckpointProcessGetRestoreThreadId.restype = ctypes.c_int
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuGetErrorName.restype = ctypes.c_int
        t = time.perf_counter()
        self._check("cuInit", lib.cuInit(0))
        self.init_s = time.perf_counter() - t
        ver = ctypes.c_int()
        lib.cuDriverGetVersion(ctypes.byref(ver))
        self.cuda_version = ver.value

    def _check(self, call: str, rc: int) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaError(call, rc, (name.value or b"?").decode())

    # -- queries ---------------------------------------------------------------------------
    def state(self, pid: int) -> str:
        st = ctypes.c_int(-1)
        self._check("cuCheckpointProcessGetState", self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(st)))
        return STATES.get(st.value, str(st.value))

    def restore_tid(self, pid: int) -> int:
        tid = ctypes.c_int(0)
        self._check("cuCheckpointProcessGetRestoreThreadId",
                    self.lib.cuCheckpointProcessGetRestoreThreadId(pid, ctypes.byref(tid)))
        return tid.value

    def device_uuids(self) -> list[str]:
        n = ctypes.c_int()
        self._check("cuDeviceGetCount", self.lib.cuDeviceGetCount(ctypes.byref(n)))
        out = []
        for i in range(n.value):
            dev = ctypes.c_int()
            self._check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(dev), i))
            u = CUuuid()
            fn = getattr(self.lib, "cuDeviceGetUuid_v2", None) or self.lib.cuDeviceGetUuid
            self._check("cuDeviceGetUuid", fn(ctypes.byref(u), dev))
            out.append(u.hex())
        return out

    # -- the four steps, each returning its duration in seconds ----------------------------
    def lock(self, pid: int, timeout_ms: int = 0) -> float:
        args = LockArgs(timeoutMs=timeout_ms)
        t = time.perf_counter()
        rc = self.lib.cuCheckpointProcessLock(pid, ctypes.byref(args) if timeout_ms else None)
        dt = time.perf_counter() - t
        self._check("cuCheckpointProcessLock", rc)
        return dt

    def checkpoint(self, pid: int) -> float:
        t = time.perf_counter()
        rc = self.lib.cuCheckpointProcessCheckpoint(pid, None)
        dt = time.perf_counter() - t
        self._check("cuCheckpointProcessCheckpoint", rc)
        return dt

    def restore(self, pid: int, pairs: list[tuple[str, str]] | None = None) -> float:
        argp = None
        if pairs:
            arr = (GpuPair * len(pairs))()
            for i, (old, new) in enumerate(pairs):
                arr[i].oldUuid.bytes[:] = bytes.fromhex(old)
                arr[i].newUuid.bytes[:] = bytes.fromhex(new)
            args = RestoreArgs(gpuPairs=ctypes.cast(arr, ctypes.POINTER(GpuPair)), gpuPairsCount=len(pairs))
            argp = ctypes.byref(args)
        t = time.perf_counter()
        rc = self.lib.cuCheckpointProcessRestore(pid, argp)
        dt = time.perf_counter() - t
        self._check("cuCheckpointProcessRestore", rc)
        return dt

    def unlock(self, pid: int) -> float:
        t = time.perf_counter()
        rc = self.lib.cuCheckpointProcessUnlock(pid, None)
        dt = time.perf_counter() - t
        self._check("cuCheckpointProcessUnlock", rc)
        return dt
