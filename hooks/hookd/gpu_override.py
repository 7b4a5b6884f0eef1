"""GPU pairs for a container's next GPU restore, set inside hookd by the standby controller.

A standby wake that moves a workload to another GPU (docs/standby.md, "Multiplexing across GPUs") does not pass
through any request hookd could read the choice from: a RAM-parked workload wakes by containerd's Resume, the shim
then calls hookd's RestoreGpu; a hibernated one by the shim's Wake, whose CRIU restore ends in the same RestoreGpu.
hookd is both the controller and the RestoreGpu server, so the controller leaves the pairs here before the wake and
takes them back after it; GpuManager.restore adds them to the request's gpu_map and reports how the restore went.

Held in memory only: a hookd restart forgets them, and the wake it retries chooses again (or wakes on the own GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# One entry per wake in flight; wakes are bounded by the controller (--standby-max-parallel-wakes), this by far.
MAX_OVERRIDES = 4096


@dataclass(slots=True)
class Override:
    pairs: dict[str, str]  # old GPU UUID -> new GPU UUID (normalized)
    used: bool = False  # a restore of the container took them
    error: str = ""  # that restore failed: its message
    driver_error: str = ""  # and the driver's CUresult name, when a driver step failed


@dataclass(slots=True)
class GpuOverrides:
    _by_key: dict[tuple[str, str], Override] = field(default_factory=dict)

    def set(self, key: tuple[str, str], pairs: dict[str, str]) -> Override:
        if key not in self._by_key and len(self._by_key) >= MAX_OVERRIDES:
            raise RuntimeError(f"{MAX_OVERRIDES} GPU overrides are set already: one is not cleared after its wake")
        self._by_key[key] = Override(dict(pairs))
        return self._by_key[key]

    def get(self, key: tuple[str, str]) -> Override | None:
        return self._by_key.get(key)

    def clear(self, key: tuple[str, str]) -> Override | None:
        return self._by_key.pop(key, None)
