"""Bounds on `kybernate.io/*` annotation values, checked at Create before anything reads or resolves them.

Annotations come from whoever may create a pod. A value is used as a path (`restore-from`) or parsed
(the rest), so an unbounded one costs the shim's event loop: `os.path.realpath` of a 1 MB `a/a/a/...`
took about 80 s. Every `kybernate.io/*` value is therefore checked here first, in linear time and
without touching the filesystem: a bad one fails the Create with INVALID_ARGUMENT naming the
annotation and the limit, and nothing else happens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PREFIX = "kybernate.io/"
RESTORE_FROM = PREFIX + "restore-from"
GPU_MAP = PREFIX + "gpu-map"
STANDBY_GPUS = PREFIX + "standby-gpus"

# Any kybernate.io/* key: longer names are not ours (and Kubernetes allows 63 bytes after the prefix).
MAX_KEY_BYTES = 128
# Any kybernate.io/* value other than restore-from: they are numbers and booleans.
MAX_VALUE_BYTES = 256
# restore-from names an archive under checkpoint_dir: a path of at most this many bytes, components
# and bytes per component (NAME_MAX). Far beyond any real archive name, far below a slow realpath.
MAX_PATH_BYTES = 1024
# gpu-map lists "<old uuid>=<new uuid>" pairs of 81 bytes: room for 16 GPUs.
MAX_GPU_MAP_BYTES = 1400
# standby-gpus (hookd's: docs/standby.md) lists GPU UUIDs of 40 bytes or indexes: room for 16 UUIDs and more.
MAX_GPU_LIST_BYTES = 1024
MAX_PATH_COMPONENTS = 32
MAX_COMPONENT_BYTES = 255


class AnnotationError(ValueError):
    """An annotation value breaks its limit; the message names the annotation, the limit and the fix."""


def check(annotations: Mapping[str, Any]) -> None:
    """Raise AnnotationError for the first `kybernate.io/*` annotation that breaks a limit."""
    for key, value in annotations.items():
        if not isinstance(key, str) or not key.startswith(PREFIX):
            continue
        shown = key if len(key) <= MAX_KEY_BYTES else key[:MAX_KEY_BYTES] + "..."
        if len(key.encode(errors="surrogatepass")) > MAX_KEY_BYTES:
            raise AnnotationError(f"annotation key {shown!r} is longer than {MAX_KEY_BYTES} bytes")
        if not isinstance(value, str):
            raise AnnotationError(f"annotation {key}: the value must be a string, got {type(value).__name__}")
        size = len(value.encode(errors="surrogatepass"))
        limit = {RESTORE_FROM: MAX_PATH_BYTES, GPU_MAP: MAX_GPU_MAP_BYTES,
                 STANDBY_GPUS: MAX_GPU_LIST_BYTES}.get(key, MAX_VALUE_BYTES)
        if size > limit:
            raise AnnotationError(f"annotation {key}: value of {size} bytes is longer than the limit of {limit} bytes")
        bad = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
        if bad is not None:
            raise AnnotationError(f"annotation {key}: value contains the control character {bad!r}; "
                                  "annotation values must be printable")
        if key == RESTORE_FROM:
            _check_path(key, value)


def _check_path(key: str, value: str) -> None:
    components = [c for c in value.split("/") if c]
    if len(components) > MAX_PATH_COMPONENTS:
        raise AnnotationError(f"annotation {key}: path has {len(components)} components, more than the limit of "
                              f"{MAX_PATH_COMPONENTS}; name an archive in the checkpoint directory")
    for component in components:
        if len(component.encode(errors="surrogatepass")) > MAX_COMPONENT_BYTES:
            raise AnnotationError(f"annotation {key}: path component {component[:32]!r}... is longer than "
                                  f"{MAX_COMPONENT_BYTES} bytes")
