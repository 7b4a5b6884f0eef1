"""Idle detection: a workload is idle when none of its signals showed activity for its idle period.

The signals, sampled every `sample_period_s` (docs/standby.md, "What idle means"):

- cpu: the CPU time of the task's cgroup (cgroup v2 cpu.stat usage_usec, v1 cpuacct.usage) grew by less
  than `cpu_idle_cores` cores over the sample;
- gpu: no process of the task above `gpu_idle_percent` SM or memory utilisation in NVML's per-process
  samples (absent where the driver does not give them per process: then the signal is "n/a" and the others
  decide);
- net: the TCP segment and UDP datagram counters of the pod's network namespace (/proc/<pid>/net/snmp)
  did not move. They count every packet of the pod, connections opened and closed between two samples
  included; a pod on the host's network namespace sees the node's traffic, so it never looks idle by this
  signal (shown as "host").

Blocking reads of /proc and /sys: `read_counters` runs in a thread. `IdleTracker` is pure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True, slots=True)
class Counters:
    """One sample of a workload's raw counters; None where the counter cannot be read here."""

    at: float  # time.monotonic() of the sample
    cpu_ns: int | None
    packets: int | None
    host_network: bool
    memory_bytes: int | None  # the cgroup's memory use (host RAM; a parked workload's VRAM copy included)


def _cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> cgroup path of the process ("" names the unified hierarchy)."""
    out: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                out[controller] = parts[2]
    return out


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cpu_ns(pid: int, root: Path = CGROUP_ROOT) -> int | None:
    paths = _cgroup_paths(pid)
    if "cpuacct" in paths and paths["cpuacct"] not in ("", "/"):
        return _read_int(root / "cpuacct" / paths["cpuacct"].lstrip("/") / "cpuacct.usage")
    if "" in paths and paths[""] not in ("", "/"):
        try:
            for line in (root / paths[""].lstrip("/") / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) * 1000
        except (OSError, ValueError):
            return None
    return None


def memory_bytes(pid: int, root: Path = CGROUP_ROOT) -> int | None:
    paths = _cgroup_paths(pid)
    if "memory" in paths and paths["memory"] not in ("", "/"):
        return _read_int(root / "memory" / paths["memory"].lstrip("/") / "memory.usage_in_bytes")
    if "" in paths and paths[""] not in ("", "/"):
        return _read_int(root / paths[""].lstrip("/") / "memory.current")
    return None


def packets(pid: int) -> int | None:
    """TCP segments in + out and UDP datagrams in + out of the network namespace the process is in."""
    try:
        lines = Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
    except OSError:
        return None
    wanted = {"Tcp": ("InSegs", "OutSegs"), "Udp": ("InDatagrams", "OutDatagrams")}
    total = 0
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        name, _, keys = header.partition(":")
        if name not in wanted:
            continue
        row = dict(zip(keys.split(), values.partition(":")[2].split(), strict=False))
        try:
            total += sum(int(row[k]) for k in wanted[name])
        except (KeyError, ValueError):
            return None
    return total


def host_network(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return False


def read_counters(pid: int, at: float) -> Counters:
    return Counters(at=at, cpu_ns=cpu_ns(pid), packets=packets(pid), host_network=host_network(pid),
                    memory_bytes=memory_bytes(pid))


@dataclass(slots=True)
class IdleTracker:
    """When the workload was last active, by which signal, and what each signal said last."""

    last_active: float  # monotonic
    last_traffic: float = float("-inf")  # monotonic; the arbiter's "busy" test
    signals: dict[str, str] = field(default_factory=dict)
    _last: Counters | None = None

    def observe(self, now: Counters, gpu_percent: int | None, *, cpu_idle_cores: float,
                gpu_idle_percent: int) -> None:
        """Fold one sample in. `gpu_percent`: the busiest of its processes' utilisation; None: not available."""
        last, self._last = self._last, now
        active = False
        if gpu_percent is None:
            self.signals["gpu"] = "n/a"
        else:
            self.signals["gpu"] = f"{gpu_percent}%"
            active |= gpu_percent > gpu_idle_percent
        if last is None or now.at <= last.at:
            return
        dt = now.at - last.at
        if now.cpu_ns is not None and last.cpu_ns is not None:
            cores = max(0, now.cpu_ns - last.cpu_ns) / 1e9 / dt
            self.signals["cpu"] = f"{cores:.3f} cores"
            active |= cores >= cpu_idle_cores
        else:
            self.signals["cpu"] = "n/a"
        if now.host_network:
            self.signals["net"] = "host"
            active = True
        elif now.packets is not None and last.packets is not None:
            moved = now.packets - last.packets
            self.signals["net"] = f"{moved} packets"
            if moved:
                active = True
                self.last_traffic = now.at
        else:
            self.signals["net"] = "n/a"
        if active:
            self.last_active = now.at

    def reset(self, at: float) -> None:
        """After a wake: active now, and the next sample starts a fresh interval (the freeze stopped the clocks)."""
        self.last_active = at
        self._last = None

    def idle_for(self, now: float) -> float:
        return max(0.0, now - self.last_active)

    def busy(self, now: float, window_s: float) -> bool:
        return now - self.last_traffic < window_s
