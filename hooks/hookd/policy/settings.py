"""Standby settings: the node's defaults (hookd flags) and each workload's policy (kybernate.io/standby* annotations).

A workload is parked by the policy only when it opts in (`kybernate.io/standby: "true"`) or the node turns it
on for everyone (`--standby-default on`). Every annotation value is checked here, bounded and in linear time,
before anything uses it; a bad one leaves the workload unmanaged (never parked by the policy), and `kybernate
status` and hookd's log say which annotation is wrong and what it wants. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

PREFIX = "kybernate.io/"
STANDBY = PREFIX + "standby"  # "true" | "false": opt in or out
IDLE = PREFIX + "standby-idle"  # idle period before parking: "300", "90s", "5m", "1h"
TIER = PREFIX + "standby-tier"  # "ram" (Pause: VRAM to host RAM, cgroup frozen) | "disk" (hibernate)
WAKE = PREFIX + "standby-wake"  # "connect" (a pending connection wakes it) | "api" (only `kybernate wake`)
PRIORITY = PREFIX + "standby-priority"  # 0..1000; the arbiter parks lower or equal priority only
EVICT_BUSY = PREFIX + "standby-evict-busy"  # "true": the arbiter may park it despite recent traffic
GPUS = PREFIX + "standby-gpus"  # GPUs a wake may move it to: "GPU-<uuid>,1" (UUIDs or NVML indexes), its own always
KEYS = (STANDBY, IDLE, TIER, WAKE, PRIORITY, EVICT_BUSY, GPUS)

TIERS = ("ram", "disk")
WAKES = ("connect", "api")
MAX_PRIORITY = 1000
# An idle period of up to a week; at least a second (the signals are sampled every second or so).
MIN_IDLE_S, MAX_IDLE_S = 1.0, 7 * 24 * 3600.0
# Like the shim's annotation limits (shim/annotation_limits.py): these values are short words and numbers.
MAX_VALUE_BYTES = 64
# standby-gpus: a list of GPU UUIDs or indexes, at most MAX_GPUS of them (a node has at most a few dozen GPUs).
MAX_GPUS = 16
MAX_GPUS_BYTES = 1024
_GPU_UUID = re.compile(r"^GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_GPU_INDEX = re.compile(r"^[0-9]{1,3}$")
_DURATION = re.compile(r"^([0-9]{1,7})(s|m|h)?$")
_UNIT_S = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


class PolicyError(ValueError):
    """An annotation or a flag value is invalid; the message names it, the value and what is wanted."""


@dataclass(frozen=True, slots=True)
class Policy:
    """How one workload is parked and woken."""

    enabled: bool = False  # parked by the policy when idle (False: only `kybernate park` parks it)
    idle_s: float = 300.0  # seconds every idle signal must stay quiet before a park
    tier: str = "ram"  # "ram": Pause (VRAM to host RAM, frozen); "disk": hibernate into the store (no process)
    wake: str = "connect"  # "connect": a pending connection on its listening sockets wakes it; "api": only a call
    priority: int = 0  # 0..1000; the arbiter never parks a higher priority to make room for a lower one
    evict_busy: bool = False  # the arbiter may park it although it had traffic within the last busy_window_s
    # GPUs besides its own a wake may move it to (UUIDs as written, or NVML indexes as strings), in the order given.
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StandbySettings:
    """The node's side: defaults for workloads without annotations, and the controller's own knobs."""

    # Run the standby controller at all (hookd --standby). Off: hookd parks nothing and serves no Standby calls.
    enabled: bool = False
    # containerd's socket: parks and wakes are containerd's Pause and Resume, so its view stays the truth.
    containerd_address: str = "/run/containerd/containerd.sock"
    # Seconds for one containerd call (a Pause moves VRAM to host RAM: 24 GiB took 13 s on an H100).
    containerd_timeout_s: float = 600.0
    # Per-workload defaults; annotations override them.
    defaults: Policy = field(default_factory=Policy)
    # Seconds between samples of the idle signals (and discovery of new workloads).
    sample_period_s: float = 1.0
    # A cgroup using less CPU than this (in cores, averaged over a sample) is CPU-idle.
    cpu_idle_cores: float = 0.05
    # A GPU process busier than this (percent SM or memory-controller utilisation, NVML) is GPU-active.
    gpu_idle_percent: int = 1
    # Seconds between looks at a parked workload's listening sockets (wake on connect): the extra delay a
    # client's first connection sees, at most, on top of the wake itself.
    watch_period_s: float = 0.05
    # Traffic within this many seconds makes a workload busy: the arbiter does not park it (a request may be
    # in flight) unless its policy says evict_busy.
    busy_window_s: float = 10.0
    # Per-GPU VRAM budget in bytes below the physical size, by GPU UUID ("all": every GPU without its own);
    # absent: the physical free VRAM.
    gpu_budget_bytes: Mapping[str, int] = field(default_factory=dict)
    # Wakes in flight on the node at once (each GPU also wakes one workload at a time): no wake storm.
    max_parallel_wakes: int = 2
    # Where hookd remembers its parks (why, when, how long), so that a restarted hookd still manages them.
    state_dir: str = "/run/kybernate/standby"
    # Seconds before a failed park or wake of a workload is tried again (doubling, at most 300 s).
    retry_s: float = 5.0
    # Host RAM the RAM-parked workloads may hold together (bytes, their cgroups' memory; 0: no limit). Above it
    # the least recently parked are demoted to disk (hibernated into the store) until they fit.
    ram_budget_bytes: int = 0
    # Seconds the room made for a starting container stays held for it (counted as used by the arbiter's other
    # decisions) until NVML shows the container holding that VRAM: a model loads for a while after its start.
    start_hold_s: float = 120.0


def parse_duration(what: str, raw: str) -> float:
    m = _DURATION.match(raw.strip())
    if not m:
        raise PolicyError(f"{what}={raw!r}: want a duration like 300, 90s, 5m or 1h")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if not MIN_IDLE_S <= seconds <= MAX_IDLE_S:
        raise PolicyError(f"{what}={raw!r}: want {MIN_IDLE_S:.0f} s to {MAX_IDLE_S / 86400:.0f} days")
    return seconds


def parse_bool(what: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise PolicyError(f"{what}={raw!r}: want true or false")
    return value == "true"


def parse_tier(what: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in TIERS:
        raise PolicyError(f"{what}={raw!r}: want ram or disk")
    return value


def parse_wake(what: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in WAKES:
        raise PolicyError(f"{what}={raw!r}: want connect or api")
    return value


def parse_priority(what: str, raw: str) -> int:
    value = raw.strip()
    if not value.isdigit() or len(value) > 4 or int(value) > MAX_PRIORITY:
        raise PolicyError(f"{what}={raw!r}: want an integer 0..{MAX_PRIORITY}")
    return int(value)


def parse_gpus(what: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of GPU UUIDs (`GPU-` and 32 hex digits in the 8-4-4-4-12 form) or NVML indexes
    (0..255), each once, at most MAX_GPUS; UUIDs lower-cased after `GPU-` as NVML writes them."""
    entries = [e.strip() for e in raw.split(",")]
    if not raw.strip() or any(not e for e in entries):
        raise PolicyError(f"{what}={raw[:80]!r}: want GPU UUIDs or indexes separated by commas, e.g. GPU-3ffe...,1")
    if len(entries) > MAX_GPUS:
        raise PolicyError(f"{what}: {len(entries)} GPUs; at most {MAX_GPUS}")
    out: list[str] = []
    for e in entries:
        if _GPU_UUID.match(e):
            e = "GPU-" + e[4:].lower()
        elif not _GPU_INDEX.match(e) or int(e) > 255:
            raise PolicyError(f"{what}: {e[:80]!r} is neither a GPU UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx) "
                              "nor an NVML index 0..255")
        else:
            e = str(int(e))
        if e in out:
            raise PolicyError(f"{what}: {e} is listed twice")
        out.append(e)
    return tuple(out)


def policy_of(annotations: Mapping[str, Any], defaults: Policy) -> Policy:
    """The workload's policy: the node's defaults with its kybernate.io/standby* annotations applied.

    Raises PolicyError for the first bad one (an unknown kybernate.io/standby-* key included: a typo must
    not silently leave the default in force)."""
    changes: dict[str, Any] = {}
    for key, value in annotations.items():
        if not isinstance(key, str) or not (key == STANDBY or key.startswith(STANDBY + "-")):
            continue
        if key not in KEYS:
            raise PolicyError(f"annotation {key[:80]}: unknown; the standby annotations are {', '.join(KEYS)}")
        if not isinstance(value, str):
            raise PolicyError(f"annotation {key}: the value must be a string, got {type(value).__name__}")
        limit = MAX_GPUS_BYTES if key == GPUS else MAX_VALUE_BYTES
        if len(value.encode(errors="surrogatepass")) > limit:
            raise PolicyError(f"annotation {key}: value longer than {limit} bytes")
        what = f"annotation {key}"
        if key == STANDBY:
            changes["enabled"] = parse_bool(what, value)
        elif key == IDLE:
            changes["idle_s"] = parse_duration(what, value)
        elif key == TIER:
            changes["tier"] = parse_tier(what, value)
        elif key == WAKE:
            changes["wake"] = parse_wake(what, value)
        elif key == PRIORITY:
            changes["priority"] = parse_priority(what, value)
        elif key == GPUS:
            changes["gpus"] = parse_gpus(what, value)
        else:
            changes["evict_busy"] = parse_bool(what, value)
    return replace(defaults, **changes) if changes else defaults


def parse_bytes(what: str, raw: str) -> int:
    """BYTES, or with Mi or Gi (`64Gi`)."""
    m = re.match(r"^([0-9]{1,15})(Mi|Gi)?$", raw.strip())
    if not m:
        raise PolicyError(f"{what}={raw!r}: want BYTES, or a number with Mi or Gi (e.g. 64Gi)")
    return int(m.group(1)) << {None: 0, "Mi": 20, "Gi": 30}[m.group(2)]


def parse_budgets(entries: list[str]) -> dict[str, int]:
    """`--standby-gpu-budget GPU-uuid=BYTES` (repeatable; BYTES may end in Mi or Gi; `all=BYTES`: every GPU)."""
    out: dict[str, int] = {}
    for entry in entries:
        uuid, sep, raw = entry.partition("=")
        m = re.match(r"^([0-9]{1,15})(Mi|Gi)?$", raw.strip())
        if not sep or not uuid.strip() or not m:
            raise PolicyError(f"--standby-gpu-budget {entry!r}: want GPU-UUID=BYTES (e.g. GPU-3ffe...=45Gi)")
        out[uuid.strip()] = int(m.group(1)) << {None: 0, "Mi": 20, "Gi": 30}[m.group(2)]
    return out
