"""The VRAM arbiter of one GPU: which running workloads to park so that a wake fits. Pure: no I/O.

Before a workload wakes, its VRAM need on each of its GPUs is compared with what is free there: the driver's
free VRAM, or less under a configured per-GPU budget (budget - used). When it does not fit, the arbiter parks
running workloads of the same GPU, least recently active first, and only those that

- opted in to standby (a workload that did not is never parked by the policy),
- have a priority lower than or equal to the waking workload's,
- had no traffic within the busy window (a request may be in flight), unless their policy allows it,

until the need fits. If even all of them would not free enough, nothing is parked: parking them would cost
their users a wake for nothing. Every decision carries its reason, which the log and `kybernate status` show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """A running workload on the GPU the arbiter could park."""

    name: str
    vram_bytes: int  # what it holds on this GPU
    priority: int
    last_active: float  # monotonic; least recently active goes first
    opted_in: bool
    busy: bool  # traffic within the busy window
    evict_busy: bool


@dataclass(frozen=True, slots=True)
class Plan:
    fits: bool  # True: after parking `victims` (maybe none) the wake fits
    victims: tuple[str, ...]
    reason: str
    skipped: tuple[str, ...] = ()  # "name: why" for candidates it would not park


def free_bytes(total: int, free: int, budget: int | None) -> int:
    """What a wake may use on the GPU: the driver's free VRAM, capped by the budget's remainder."""
    if budget is None:
        return free
    used = total - free
    return max(0, min(free, budget - used))


def plan(gpu: str, need: int, total: int, free: int, budget: int | None, priority: int,
         candidates: Sequence[Candidate]) -> Plan:
    """Victims (least recently active first) that make `need` bytes fit on `gpu`, which has `total` bytes,
    `free` of them free, and maybe a `budget`: parking X bytes frees X, and lowers the use the budget counts."""
    available = free_bytes(total, free, budget)
    if need <= available:
        return Plan(True, (), f"{gpu}: needs {_gib(need)}, {_gib(available)} free")
    eligible: list[Candidate] = []
    skipped: list[str] = []
    for c in candidates:
        if not c.opted_in:
            skipped.append(f"{c.name}: not opted in to standby")
        elif c.priority > priority:
            skipped.append(f"{c.name}: priority {c.priority} above {priority}")
        elif c.busy and not c.evict_busy:
            skipped.append(f"{c.name}: recent traffic")
        elif c.vram_bytes <= 0:
            skipped.append(f"{c.name}: holds no VRAM here")
        else:
            eligible.append(c)
    eligible.sort(key=lambda c: (c.last_active, c.priority, c.name))
    victims: list[Candidate] = []
    freed = 0
    for c in eligible:
        if free_bytes(total, free + freed, budget) >= need:
            break
        victims.append(c)
        freed += c.vram_bytes
    if free_bytes(total, free + freed, budget) < need:
        return Plan(False, (), f"{gpu}: needs {_gib(need)}, {_gib(available)} free, and parking every eligible "
                                f"workload would free only {_gib(freed)}", tuple(skipped))
    names = tuple(c.name for c in victims)
    return Plan(True, names, f"{gpu}: needs {_gib(need)}, {_gib(available)} free; parking least recently active "
                             f"{', '.join(names)} frees {_gib(freed)}", tuple(skipped))


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
