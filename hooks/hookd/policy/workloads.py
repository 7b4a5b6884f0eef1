"""Which workloads hookd's standby policy manages: every GPU task the shim keeps an intent file for.

The shim writes `<intent_dir>/<namespace>/<container_id>.json` for each GPU task at Create and removes it at
Delete (hooks/api/intent.py), with the bundle's path and the task's init pid. The bundle's config.json is the
OCI spec containerd gave the shim: its annotations (CRI copies the pod's and the container's there) carry the
workload's kybernate.io/standby* policy. Blocking (small file reads): call through a thread.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from kybernate.hooks.api import intent, procfs

from .settings import Policy, PolicyError, policy_of

log = logging.getLogger(__name__)

# An OCI spec is a few KiB to a few hundred; anything beyond this is not read.
MAX_SPEC_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Workload:
    """One GPU task as the intent file and its bundle describe it."""

    namespace: str
    container_id: str
    bundle: str
    init_pid: int  # 0 before Start or when the init is gone
    shim_pid: int
    desired: str  # the shim's intent: running, parked, dump
    phase: str  # the shim's lifecycle phase (live, parked, ...)
    manifest: dict[str, object] | None  # the last GPU checkpoint's manifest (what a wake needs in VRAM)
    policy: Policy
    policy_error: str  # non-empty: its annotations are invalid, the policy leaves it alone

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.container_id)

    @property
    def name(self) -> str:
        return f"{self.namespace}/{self.container_id}"


def discover(intent_dir: str, defaults: Policy) -> list[Workload]:
    """Every GPU task with a live init process, with its policy (or the reason its policy is refused)."""
    out: list[Workload] = []
    for path in intent.scan(intent_dir):
        try:
            record = intent.read(path)
        except (OSError, intent.IntentError):
            continue  # being rewritten or not ours; the reconciler logs unreadable ones
        if not record.init_pid or not procfs.alive(record.init_pid):
            continue
        policy, error = defaults, ""
        try:
            policy = policy_of(bundle_annotations(record.bundle), defaults)
        except (OSError, ValueError) as err:  # PolicyError is a ValueError; so is a malformed spec
            error = str(err)
        out.append(Workload(namespace=record.namespace, container_id=record.container_id, bundle=record.bundle,
                            init_pid=record.init_pid, shim_pid=record.shim_pid, desired=record.desired,
                            phase=record.phase, manifest=record.manifest, policy=policy, policy_error=error))
    return out


def bundle_annotations(bundle: str) -> dict[str, object]:
    """The annotations of the bundle's OCI spec; ValueError when the spec is not what containerd writes."""
    path = Path(bundle) / "config.json"
    with open(path, "rb") as f:
        data = f.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise PolicyError(f"{path}: larger than {MAX_SPEC_BYTES} bytes")
    spec = json.loads(data)
    notes = spec.get("annotations") if isinstance(spec, dict) else None
    return dict(notes) if isinstance(notes, dict) else {}
