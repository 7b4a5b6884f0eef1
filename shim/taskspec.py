"""The OCI spec of a task, read once at Create into what the shim needs of it.

Every annotation the shim honours is parsed here and nowhere else; a bad value fails the Create
with INVALID_ARGUMENT before anything is started.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import annotation_limits, restore_from
from .errors import FailedPrecondition, InvalidArgument
from .runtime_options import KybernateOptions

ANNOTATION_PREFIX = "kybernate.io/"
GPU = ANNOTATION_PREFIX + "gpu"
LOCK_TIMEOUT_MS = ANNOTATION_PREFIX + "lock-timeout-ms"
PAUSE_RELEASES_VRAM = ANNOTATION_PREFIX + "pause-releases-vram"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    container_id: str
    namespace: str
    bundle: str
    gpu: bool  # a GPU container: GPU steps run around its pause, resume, checkpoint and start
    options: KybernateOptions  # the node's settings with this pod's annotation overrides applied
    restore_from: str | None  # the `kybernate.io/restore-from` archive reference, if any
    container_name: str | None  # CRI's container name (which container of a pod an archive holds)

    @classmethod
    def parse(cls, container_id: str, namespace: str, bundle: str, spec: Mapping[str, Any],
              base: KybernateOptions) -> TaskSpec:
        notes = spec.get("annotations") or {}
        if not isinstance(notes, Mapping):
            raise InvalidArgument(f"{container_id}: spec annotations are not a map")
        try:
            # Before anything reads or resolves a kybernate.io/* value: bounded, linear, no filesystem.
            annotation_limits.check(notes)
        except annotation_limits.AnnotationError as err:
            raise InvalidArgument(str(err)) from err
        try:
            reference = restore_from.requested(dict(spec))
        except restore_from.RestoreError as err:
            raise FailedPrecondition(f"{container_id}: cannot restore: {err}") from err
        name = notes.get(restore_from.CONTAINER_NAME)
        return cls(
            container_id=container_id, namespace=namespace, bundle=bundle, gpu=is_gpu_container(spec),
            options=options_with_annotations(base, notes), restore_from=reference,
            container_name=str(name) if name else None,
        )


def is_gpu_container(spec: Mapping[str, Any]) -> bool:
    """A GPU container: NVIDIA devices in the spec, NVIDIA_VISIBLE_DEVICES set, or opted in by annotation."""
    notes = spec.get("annotations") or {}
    flag = str(notes.get(GPU, "")).lower()
    if flag in ("true", "false"):
        return flag == "true"
    devices = ((spec.get("linux") or {}).get("devices")) or []
    if any(str(d.get("path", "")).startswith("/dev/nvidia") for d in devices if isinstance(d, dict)):
        return True
    for entry in (spec.get("process") or {}).get("env") or []:
        name, _, value = str(entry).partition("=")
        if name == "NVIDIA_VISIBLE_DEVICES" and value not in ("", "void", "none"):
            return True
    return False


def options_with_annotations(base: KybernateOptions, notes: Mapping[str, Any]) -> KybernateOptions:
    """Per-pod overrides: `kybernate.io/lock-timeout-ms`, `kybernate.io/pause-releases-vram`."""
    changes: dict[str, Any] = {}
    raw = notes.get(LOCK_TIMEOUT_MS)
    if raw is not None:
        if not str(raw).isdigit() or not 0 < int(raw) <= 3_600_000:
            raise InvalidArgument(f"annotation {LOCK_TIMEOUT_MS}={raw!r}: want milliseconds, 1..3600000")
        changes["lock_timeout_ms"] = int(raw)
    raw = notes.get(PAUSE_RELEASES_VRAM)
    if raw is not None:
        if str(raw).lower() not in ("true", "false"):
            raise InvalidArgument(f"annotation {PAUSE_RELEASES_VRAM}={raw!r}: want true or false")
        changes["pause_releases_vram"] = str(raw).lower() == "true"
    return replace(base, **changes) if changes else base
