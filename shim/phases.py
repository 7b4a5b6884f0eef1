"""Per-phase timestamps of one `start` or `delete` invocation, written as one line into the shim's log.

The line goes to the bundle's `log` fifo (containerd copies it into its own log) in the same logfmt
as the daemon's records: `msg=phases action=start id=… import=12.1 spec=12.9 … total=61.0` with
milliseconds since the process began, so a slow pod start can be split into its steps from the node's
logs alone. Standard library only and cheap (a few perf_counter calls): it is on every start path.
"""

from __future__ import annotations

import os
import time

# The kernel's start time of this process is only known to 10 ms; measure from the first import of the
# shim's package instead and add the interpreter's own start as `boot` (from /proc, coarse).
_T0 = time.perf_counter()
_marks: list[tuple[str, float]] = []


def reset() -> None:
    """Start counting again: a resident process's worker begins its command here, not at import."""
    global _T0
    _T0 = time.perf_counter()
    _marks.clear()


def mark(name: str) -> None:
    _marks.append((name, time.perf_counter()))


def _boot_ms() -> float:
    """Milliseconds from exec to the first shim import, from the process start time (10 ms ticks)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0
    age_s = uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")
    return max(0.0, age_s * 1000 - (time.perf_counter() - _T0) * 1000)


def line(action: str, container_id: str) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    fields = [f"{name}={(t - _T0) * 1000:.1f}" for name, t in _marks]
    return (
        f"time={stamp}Z level=info logger=kybernate.shim.phases msg=phases runtime=io.containerd.kybernate.v1 "
        f"action={action} id={container_id} boot={_boot_ms():.0f} " + " ".join(fields)
    )


def emit(bundle: str, action: str, container_id: str) -> None:
    """Write the phases to `bundle/log` if containerd is reading it; never blocks, never fails."""
    mark("total")
    text = line(action, container_id) + "\n"
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # no reader (delete after containerd closed it) or no fifo
    try:
        os.write(fd, text.encode())
    except OSError:
        pass
    finally:
        os.close(fd)
