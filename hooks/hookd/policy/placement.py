"""Which GPU a waking workload goes to, when it may use several (kybernate.io/standby-gpus). Pure: no I/O.

A parked workload of one GPU whose policy allows other GPUs wakes

1. on its own GPU if that has room without parking anyone;
2. else on the first allowed GPU (in the annotation's order) with room without parking anyone;
3. else where the arbiter's plan parks the fewest workloads (its own GPU preferred on a tie, then the order);
4. nowhere if no allowed GPU can make room: the wake is refused with every GPU's reason.

A wake onto another GPU is a restore with GPU pairs (own -> chosen); docs/standby.md, "Multiplexing across GPUs".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import arbiter


@dataclass(frozen=True, slots=True)
class GpuRoom:
    """One allowed GPU as NVML and the controller see it now."""

    uuid: str
    total: int
    free: int
    budget: int | None
    candidates: tuple[arbiter.Candidate, ...]  # running workloads on it the arbiter could park


@dataclass(frozen=True, slots=True)
class Placement:
    gpu: str  # where it wakes; "" when no allowed GPU can make room
    plan: arbiter.Plan  # the arbiter's plan there (its victims are parked first); the own GPU's when gpu is ""
    reason: str  # one line for the log: which GPU and why


def allowed_gpus(own: str, wanted: Sequence[str], index_to_uuid: Mapping[int, str]) -> tuple[list[str], list[str]]:
    """The GPUs a wake may use, own first, then `wanted` (UUIDs, or NVML indexes as strings) in order, each once,
    as this node knows them; and the entries this node has no GPU for (the caller logs them)."""
    out, unknown = [own], []
    known = set(index_to_uuid.values())
    for entry in wanted:
        uuid = index_to_uuid.get(int(entry), "") if entry.isdigit() else entry
        if uuid not in known:
            unknown.append(entry)
        elif uuid not in out:
            out.append(uuid)
    return out, unknown


def choose(own: str, need: int, priority: int, gpus: Sequence[GpuRoom]) -> Placement:
    """Where a workload of `need` bytes and `priority` wakes among `gpus` (its own among them, the rest in the
    order allowed); see the module's rules."""
    plans = {g.uuid: arbiter.plan(g.uuid, need, g.total, g.free, g.budget, priority, g.candidates) for g in gpus}
    order = [own] + [g.uuid for g in gpus if g.uuid != own]
    own_plan = plans.get(own)
    own_said = own_plan.reason if own_plan is not None else f"{own}: not in NVML's inventory"
    if own_plan is not None and own_plan.fits and not own_plan.victims:
        return Placement(own, own_plan, f"own GPU has room: {own_plan.reason}")
    for uuid in order[1:]:
        p = plans.get(uuid)
        if p is not None and p.fits and not p.victims:
            return Placement(uuid, p, f"own GPU has no room without parking ({own_said}); {p.reason}")
    fitting = [(len(p.victims), 0 if uuid == own else 1, i, uuid) for i, uuid in enumerate(order)
               if (p := plans.get(uuid)) is not None and p.fits]
    if fitting:
        evictions, _, _, uuid = min(fitting)
        p = plans[uuid]
        where = "own GPU" if uuid == own else uuid
        return Placement(uuid, p, f"no allowed GPU has room without parking; fewest evictions ({evictions}) on "
                                  f"{where}: {p.reason}")
    said = "; ".join(plans[u].reason for u in order if u in plans)
    refusal = own_plan or arbiter.Plan(False, (), own_said)
    return Placement("", refusal, f"no allowed GPU can make room: {said or own_said}")
