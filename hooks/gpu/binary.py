"""The second driver backend: NVIDIA's `cuda-checkpoint` utility, one exec per step.

For operators who prefer the vendor tool. It costs a process start and a CUDA init per step (about
15 ms each with persistence mode on the H100 machine, far more without it), where the ctypes
backend pays once. Same interface (cuda.CheckpointDriver) and the same error names: the tool
prints the driver's cuGetErrorString in quotes, which cuda.ERROR_STRINGS maps back.

CLI of driver 580 (verified against the real binary on the H100 machine):
  --get-state --pid P                  prints running | locked | checkpointed | failed
  --action lock --pid P [--timeout MS]
  --action checkpoint|unlock --pid P
  --action restore --pid P [--device-map OLD=NEW,OLD=NEW]   the map must cover every checkpointed GPU
  --get-restore-tid --pid P            prints the thread id
Errors: exit status 1 and `Could not <action> on process ID <pid>: "<driver string>"` (or
`Error getting process state for process ID <pid>: "..."`) on stderr.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence

from kybernate.hooks.api.errors import DriverUnavailable

from .cuda import ERROR_CODES, ERROR_STRINGS, CudaError, CudaState, normalize_uuid

DEFAULT_BINARY = "cuda-checkpoint"
_QUOTED = re.compile(r'"([^"]*)"')
_VERSION = re.compile(r"Version ([0-9][0-9.]*[0-9])")


class CudaCheckpointBinary:
    """Runs `cuda-checkpoint` for every step. Blocking: call through blocking.run_blocking only."""

    def __init__(self, path: str = DEFAULT_BINARY, step_timeout_s: float = 600.0) -> None:
        resolved = shutil.which(path)
        if resolved is None:
            raise DriverUnavailable(
                f"the cuda-checkpoint binary {path!r} was not found or is not executable; install it "
                "(github.com/NVIDIA/cuda-checkpoint) or pass --cuda-checkpoint with its path, or use --backend ctypes"
            )
        self.path = resolved
        self.step_timeout_s = step_timeout_s
        out = self._run(["--help"], "help", None)
        match = _VERSION.search(out)
        self.driver_version = match.group(1) if match else ""  # the display driver's, e.g. 580.159.04

    @property
    def backend(self) -> str:
        return "binary"

    @property
    def cuda_version(self) -> int:
        return 0  # the tool does not say; Health reports NVML's driver version instead

    def _run(self, args: list[str], call: str, pid: int | None) -> str:
        try:
            done = subprocess.run(
                [self.path, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=self.step_timeout_s,
            )
        except subprocess.TimeoutExpired as err:
            raise CudaError(call, ERROR_CODES["CUDA_ERROR_TIMEOUT"], "CUDA_ERROR_TIMEOUT", pid,
                            f"cuda-checkpoint did not finish within {self.step_timeout_s:g} s") from err
        except OSError as err:
            raise CudaError(call, -1, "EXEC_FAILED", pid, f"cannot run {self.path}: {err}") from err
        if done.returncode != 0:
            text = (done.stderr or done.stdout).strip()
            match = _QUOTED.search(text)
            name = ERROR_STRINGS.get(match.group(1), "CUDA_ERROR_UNKNOWN") if match else "CUDA_ERROR_UNKNOWN"
            raise CudaError(call, ERROR_CODES.get(name, -1), name, pid, f"cuda-checkpoint: {text}")
        return done.stdout

    def get_state(self, pid: int) -> CudaState:
        out = self._run(["--get-state", "--pid", str(pid)], "get-state", pid).strip()
        try:
            return CudaState[out.upper()]
        except KeyError:
            raise CudaError("get-state", 0, "UNKNOWN_STATE", pid, f"cuda-checkpoint printed {out!r}") from None

    def lock(self, pid: int, timeout_ms: int) -> None:
        timeout = ["--timeout", str(timeout_ms)] if timeout_ms > 0 else []
        self._run(["--action", "lock", "--pid", str(pid), *timeout], "lock", pid)

    def checkpoint(self, pid: int) -> None:
        self._run(["--action", "checkpoint", "--pid", str(pid)], "checkpoint", pid)

    def restore(self, pid: int, pairs: Sequence[tuple[str, str]] = ()) -> None:
        pairs_text = ",".join(f"{normalize_uuid(o)}={normalize_uuid(n)}" for o, n in pairs)
        device_map = ["--device-map", pairs_text] if pairs else []
        self._run(["--action", "restore", "--pid", str(pid), *device_map], "restore", pid)

    def unlock(self, pid: int) -> None:
        self._run(["--action", "unlock", "--pid", str(pid)], "unlock", pid)

    def restore_thread_id(self, pid: int) -> int:
        return int(self._run(["--get-restore-tid", "--pid", str(pid)], "get-restore-tid", pid).strip())

    def close(self) -> None:
        """Nothing held between steps."""

