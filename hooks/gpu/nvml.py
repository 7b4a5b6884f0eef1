"""GPU inventory through NVML (nvidia-ml-py): GPUs, free VRAM, and which process holds what where.

NVML is optional: without it hookd still checkpoints and restores, but cannot record which GPUs and
how much VRAM a container used, so there is no VRAM pre-check and no automatic remap. That is said
once, clearly, at start.

Every call blocks (NVML talks to the kernel driver): call inventory() through run_blocking.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kybernate.hooks.api.model import NodeGpu

from .cuda import normalize_uuid

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """One compute process on one GPU, as NVML lists it (a checkpointed process is not listed)."""

    pid: int
    gpu_uuid: str
    used_bytes: int


@dataclass(frozen=True, slots=True)
class Inventory:
    driver_version: str
    gpus: tuple[NodeGpu, ...]
    processes: tuple[ProcessUsage, ...]

    def gpu(self, uuid: str) -> NodeGpu | None:
        want = normalize_uuid(uuid)
        return next((g for g in self.gpus if g.uuid == want), None)

    def usage_of(self, pids: Iterable[int]) -> dict[int, list[ProcessUsage]]:
        wanted = set(pids)
        out: dict[int, list[ProcessUsage]] = {}
        for p in self.processes:
            if p.pid in wanted:
                out.setdefault(p.pid, []).append(p)
        return out


class Nvml:
    """A resident NVML session. `library` is a path to libnvidia-ml.so.1, or "" for the loader's search."""

    def __init__(self, library: str = "") -> None:
        self.library = library
        self._nvml: Any = None
        self.error = ""

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def start(self) -> bool:
        """nvmlInit once. False (and one clear log line) when NVML cannot be used here."""
        try:
            import pynvml  # nvidia-ml-py; imported here so hookd starts without it
        except ImportError as err:
            self.error = f"nvidia-ml-py is not installed ({err})"
        else:
            try:
                if self.library and pynvml.nvmlLib is None:
                    # nvidia-ml-py dlopens "libnvidia-ml.so.1" by name on first init; loading the
                    # configured path first makes it use that one (it keeps the first library it has).
                    pynvml.nvmlLib = ctypes.CDLL(self.library)
                pynvml.nvmlInit()
                self._nvml = pynvml
            except (OSError, pynvml.NVMLError) as err:
                self.error = f"NVML init failed: {err}"
        if self._nvml is None:
            log.warning(
                "NVML unavailable: no GPU inventory, so no VRAM pre-check before restore and no automatic GPU remap",
                extra={"fields": {"reason": self.error, "library": self.library or "libnvidia-ml.so.1"}},
            )
            return False
        return True

    def inventory(self) -> Inventory | None:
        """GPUs with free memory, and every compute process's usage. None without NVML."""
        n = self._nvml
        if n is None:
            return None
        gpus: list[NodeGpu] = []
        usage: list[ProcessUsage] = []
        for index in range(n.nvmlDeviceGetCount()):
            handle = n.nvmlDeviceGetHandleByIndex(index)
            uuid = normalize_uuid(_text(n.nvmlDeviceGetUUID(handle)))
            memory = n.nvmlDeviceGetMemoryInfo(handle)
            try:
                minor = int(n.nvmlDeviceGetMinorNumber(handle))
            except n.NVMLError:
                minor = index  # not supported on some platforms; the index is the usual minor
            gpus.append(NodeGpu(uuid=uuid, name=_text(n.nvmlDeviceGetName(handle)), index=index, minor=minor,
                                memory_total_bytes=int(memory.total), memory_free_bytes=int(memory.free)))
            try:
                listed = n.nvmlDeviceGetComputeRunningProcesses(handle)
            except n.NVMLError as err:
                log.warning("NVML cannot list processes", extra={"fields": {"gpu": uuid, "error": str(err)}})
                listed = []
            for p in listed:
                usage.append(ProcessUsage(pid=int(p.pid), gpu_uuid=uuid, used_bytes=int(p.usedGpuMemory or 0)))
        return Inventory(driver_version=_text(n.nvmlSystemGetDriverVersion()), gpus=tuple(gpus), processes=tuple(usage))

    def utilization(self, since_us: int) -> dict[int, int] | None:
        """Per process, the highest SM or memory-controller utilisation (percent) NVML sampled after `since_us`
        (its own microsecond clock; 0: everything it kept). None where the driver gives no per-process samples
        (or without NVML): then GPU activity is not one of the idle signals."""
        n = self._nvml
        if n is None:
            return None
        out: dict[int, int] = {}
        supported = False
        for index in range(n.nvmlDeviceGetCount()):
            handle = n.nvmlDeviceGetHandleByIndex(index)
            try:
                samples = n.nvmlDeviceGetProcessUtilization(handle, since_us)
            except n.NVMLError as err:
                # NOT_FOUND: no process had a sample since then, which is an answer; anything else is not.
                if getattr(err, "value", None) == n.NVML_ERROR_NOT_FOUND:
                    supported = True
                continue
            supported = True
            for s in samples:
                pid = int(s.pid)
                out[pid] = max(out.get(pid, 0), int(s.smUtil), int(s.memUtil))
        return out if supported else None

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as err:
                log.debug("nvmlShutdown failed", extra={"fields": {"error": str(err)}})
            self._nvml = None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
