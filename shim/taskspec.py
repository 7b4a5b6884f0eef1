"""The OCI spec of a task, read once at Create into what the shim needs of it.

Every annotation the shim honours is parsed here and nowhere else; a bad value fails the Create
with INVALID_ARGUMENT before anything is started.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import annotation_limits, gpu_map, restore_from
from .errors import FailedPrecondition, InvalidArgument
from .runtime_options import KybernateOptions

ANNOTATION_PREFIX = "kybernate.io/"
GPU = ANNOTATION_PREFIX + "gpu"
LOCK_TIMEOUT_MS = ANNOTATION_PREFIX + "lock-timeout-ms"
PAUSE_RELEASES_VRAM = ANNOTATION_PREFIX + "pause-releases-vram"
# VRAM a GPU container will hold on each of its GPUs: before it starts, hookd's standby arbiter makes room
# (docs/standby.md). "20Gi", "512Mi" or bytes.
VRAM_REQUEST = ANNOTATION_PREFIX + "vram-request"
MAX_VRAM_REQUEST = 1 << 50  # 1 PiB: far above any GPU, far below an overflow
# Preemption resilience (docs/resilience.md).
CHECKPOINT_KEY = ANNOTATION_PREFIX + "checkpoint-key"
CHECKPOINT_ON_STOP = ANNOTATION_PREFIX + "checkpoint-on-stop"
CHECKPOINT_ON_STOP_TIMEOUT = ANNOTATION_PREFIX + "checkpoint-on-stop-timeout"
CHECKPOINT_ON_STOP_SIGNAL = ANNOTATION_PREFIX + "checkpoint-on-stop-signal"
CHECKPOINT_EVERY = ANNOTATION_PREFIX + "checkpoint-every"
CHECKPOINT_KEEP = ANNOTATION_PREFIX + "checkpoint-keep"
RESUME = ANNOTATION_PREFIX + "resume"
RESILIENCE = (CHECKPOINT_KEY, CHECKPOINT_ON_STOP, CHECKPOINT_ON_STOP_TIMEOUT, CHECKPOINT_ON_STOP_SIGNAL,
              CHECKPOINT_EVERY, CHECKPOINT_KEEP, RESUME)
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
DEFAULT_KEEP = 3  # generations per key, as `kybernate store gc --keep`'s default
MAX_KEEP = 1000
EVERY_RANGE_S = (1.0, 7 * 86400.0)
ON_STOP_TIMEOUT_RANGE_S = (1.0, 3600.0)
SIGKILL, SIGTERM = 9, 15
# Stop signals a checkpoint-on-stop may wait for: the runtime never sees the image's STOPSIGNAL, so a pod whose
# image stops on another signal names it (SIGKILL and SIGSTOP cannot be caught, so they are never stop signals).
STOP_SIGNALS = {"SIGTERM": 15, "SIGINT": 2, "SIGQUIT": 3, "SIGHUP": 1, "SIGUSR1": 10, "SIGUSR2": 12,
                "SIGWINCH": 28, "SIGPWR": 30, "SIGRTMIN+3": 37}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Resilience:
    """What a task asked for of preemption resilience (docs/resilience.md); None on the TaskSpec when nothing."""

    key: str  # the store key: kybernate.io/checkpoint-key or its default (hooks/api/checkpoint_key.py)
    on_stop: bool  # checkpoint into the store when the stop signal arrives, then let the stop go on
    on_stop_timeout_s: float  # the checkpoint-on-stop's budget; past it the stop goes on without one
    stop_signal: int  # the signal that stops the container (SIGTERM unless the pod names another)
    every_s: float | None  # periodic leave-running checkpoints, this many seconds apart; None: none
    keep: int  # generations of the key kept after each of this task's checkpoints
    resume_latest: bool  # at Create, restore the key's newest complete generation if there is one


@dataclass(frozen=True, slots=True)
class TaskSpec:
    container_id: str
    namespace: str
    bundle: str
    gpu: bool  # a GPU container: GPU steps run around its pause, resume, checkpoint and start
    options: KybernateOptions  # the node's settings with this pod's annotation overrides applied
    restore_from: str | None  # the `kybernate.io/restore-from` archive reference, if any
    container_name: str | None  # CRI's container name (which container of a pod an archive holds)
    resilience: Resilience | None = None  # checkpoint-on-stop, periodic checkpoints, resume: latest
    # Where a restore's checkpointed GPUs land: kybernate.io/gpu-map, else the container's own GPUs.
    gpu_targets: gpu_map.GpuTargets = gpu_map.GpuTargets()
    vram_request: int = 0  # kybernate.io/vram-request in bytes, per GPU of the container; 0: not said

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
        options = options_with_annotations(base, notes)
        resilience = resilience_from_annotations(notes, namespace, container_id, options)
        if resilience is not None and resilience.resume_latest and reference is not None:
            raise InvalidArgument(f"{container_id}: annotations {RESUME} and {restore_from.ANNOTATION} were both "
                                  "given: a container restores from one checkpoint; keep one of them")
        env = (spec.get("process") or {}).get("env") or []
        try:
            targets = gpu_map.targets_from_spec(notes, env if isinstance(env, list) else [])
        except gpu_map.GpuMapError as err:
            raise InvalidArgument(f"{container_id}: {err}") from err
        gpu = is_gpu_container(spec)
        return cls(
            container_id=container_id, namespace=namespace, bundle=bundle, gpu=gpu,
            options=options, restore_from=reference,
            container_name=str(name) if name else None, resilience=resilience,
            gpu_targets=targets, vram_request=vram_request(notes) if gpu else 0,
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


def vram_request(notes: Mapping[str, Any]) -> int:
    """`kybernate.io/vram-request`: bytes, or a number with Mi or Gi; 0 when not given."""
    raw = notes.get(VRAM_REQUEST)
    if raw is None:
        return 0
    text = str(raw).strip()
    unit = {"Mi": 20, "Gi": 30}.get(text[-2:], 0)
    digits = text[:-2] if unit else text
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 16):
        raise InvalidArgument(f"annotation {VRAM_REQUEST}={raw!r}: want the VRAM it will use on each of its GPUs, "
                              "as bytes or a number with Mi or Gi (e.g. 20Gi)")
    value = int(digits) << unit
    if not 0 < value <= MAX_VRAM_REQUEST:
        raise InvalidArgument(f"annotation {VRAM_REQUEST}={raw!r}: want more than 0 and at most 1 PiB")
    return value


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


def resilience_from_annotations(notes: Mapping[str, Any], namespace: str, container_id: str,
                                options: KybernateOptions) -> Resilience | None:
    """The resilience annotations, checked (INVALID_ARGUMENT names the annotation and what it wants); None when
    none is set, and for a pod's sandbox (a pod's annotations reach its sandbox too)."""
    if not any(k in notes for k in RESILIENCE) or notes.get(CONTAINER_TYPE) == "sandbox":
        return None
    from kybernate.hooks.api import checkpoint_key  # with hooks/api/store.py: only for a pod that asks
    from kybernate.hooks.api.store import BadKey

    text = {k: str(notes[k]) for k in RESILIENCE if k in notes}
    try:
        key = checkpoint_key.key_for({str(k): str(v) for k, v in notes.items()}, namespace, container_id)
    except BadKey as err:
        raise InvalidArgument(f"annotation {CHECKPOINT_KEY}: {err}") from err
    on_stop = _flag(text, CHECKPOINT_ON_STOP)
    timeout = options.checkpoint_on_stop_timeout_s
    if CHECKPOINT_ON_STOP_TIMEOUT in text:
        timeout = _duration(text, CHECKPOINT_ON_STOP_TIMEOUT, ON_STOP_TIMEOUT_RANGE_S)
    every = _duration(text, CHECKPOINT_EVERY, EVERY_RANGE_S) if CHECKPOINT_EVERY in text else None
    keep = DEFAULT_KEEP
    if CHECKPOINT_KEEP in text:
        raw = text[CHECKPOINT_KEEP]
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_KEEP):
            raise InvalidArgument(f"annotation {CHECKPOINT_KEEP}={raw!r}: want a number of generations, 1..{MAX_KEEP}")
        keep = int(raw)
    resume = text.get(RESUME)
    if resume is not None and resume != "latest":
        raise InvalidArgument(f"annotation {RESUME}={resume!r}: the only value is 'latest' (the key's newest "
                              "complete checkpoint, else a fresh start)")
    return Resilience(key=key, on_stop=on_stop, on_stop_timeout_s=timeout,
                      stop_signal=_stop_signal(text), every_s=every, keep=keep, resume_latest=resume == "latest")


def parse_duration(text: str) -> float:
    """`90`, `90s`, `1m30s`, `2h`, `500ms` -> seconds; ValueError otherwise (linear, bounded input)."""
    if text.isascii() and text.isdigit():
        return float(text)
    total, number, unit = 0.0, "", ""
    for ch in text:
        if not ch.isascii():
            raise ValueError(text)
        if ch.isdigit() or ch == ".":
            if unit:  # a new number after a unit: 1m30s
                total, number, unit = total + _amount(number, unit), "", ""
            number += ch
        elif ch.isalpha() and number:
            unit += ch
        else:
            raise ValueError(text)
    return total + _amount(number, unit)


def _amount(number: str, unit: str) -> float:
    if unit not in _DURATION_UNITS or number.count(".") > 1 or number in ("", "."):
        raise ValueError(number + unit)
    return float(number) * _DURATION_UNITS[unit]


def _duration(text: Mapping[str, str], key: str, bounds: tuple[float, float]) -> float:
    raw = text[key]
    low, high = bounds
    try:
        seconds = parse_duration(raw)
    except ValueError:
        raise InvalidArgument(f"annotation {key}={raw!r}: want a duration such as 30s, 5m or 1h30m") from None
    if not low <= seconds <= high:
        raise InvalidArgument(f"annotation {key}={raw!r}: want a duration from {low:g} s to {high:g} s")
    return seconds


def _flag(text: Mapping[str, str], key: str) -> bool:
    raw = text.get(key, "false")
    if raw.lower() not in ("true", "false"):
        raise InvalidArgument(f"annotation {key}={raw!r}: want true or false")
    return raw.lower() == "true"


def _stop_signal(text: Mapping[str, str]) -> int:
    raw = text.get(CHECKPOINT_ON_STOP_SIGNAL)
    if raw is None:
        return SIGTERM
    name = raw.upper() if raw.upper().startswith("SIG") else "SIG" + raw.upper()
    if name in STOP_SIGNALS:
        return STOP_SIGNALS[name]
    if raw.isascii() and raw.isdigit() and int(raw) in STOP_SIGNALS.values():
        return int(raw)
    raise InvalidArgument(f"annotation {CHECKPOINT_ON_STOP_SIGNAL}={raw!r}: want one of "
                          f"{', '.join(STOP_SIGNALS)} (or its number); SIGKILL and SIGSTOP cannot stop a program "
                          "gracefully")
