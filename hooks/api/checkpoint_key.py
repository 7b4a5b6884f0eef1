"""The store key of a container's workload: `kybernate.io/checkpoint-key`, or a default that a replacement
pod of the same workload computes again.

One function, used by the shim (checkpoint-on-stop, periodic checkpoints, resume: latest) and by hookd, so
that both always name the same key (docs/resilience.md).

The runtime sees only the OCI spec: CRI puts the pod's namespace, the pod's name and the container's name
in its annotations, but not the pod's owner (Job, Deployment, StatefulSet). So the default is

    CRI container:    <pod namespace>_<pod name>_<container name>
    other (ctr):      <containerd namespace>_<container id>

`_` cannot occur in Kubernetes names, so the parts cannot run into each other. The default is stable
across replacements for StatefulSets (and any pod re-created under its own name); a Job's or a
Deployment's pods get new names, so they set `kybernate.io/checkpoint-key` in the pod template.

A key must pass store.validate_key. An explicit annotation is taken as written (a bad one is an error the
caller reports); a default is made valid: characters outside the key alphabet become `-`, and a default
that had to be changed or shortened to 128 characters ends in `-` and 16 hex digits of the sha256 of what
it was built from, so two different containers never share a key by accident.

Standard library only: the shim imports it at Create.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from .store import MAX_KEY_LENGTH, validate_key

ANNOTATION = "kybernate.io/checkpoint-key"
POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
POD_NAME = "io.kubernetes.cri.sandbox-name"
CONTAINER_NAME = "io.kubernetes.cri.container-name"
SEPARATOR = "_"
_HASH_CHARS = 16
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:+=")


def key_for(annotations: Mapping[str, str], namespace: str, container_id: str) -> str:
    """The store key for this container: the annotation when set (validated: store.BadKey when it cannot be
    a key), else the default described in the module's docstring (always valid)."""
    explicit = annotations.get(ANNOTATION)
    if explicit:
        return validate_key(explicit)
    return default_key(annotations, namespace, container_id)


def default_key(annotations: Mapping[str, str], namespace: str, container_id: str) -> str:
    pod_namespace, pod, container = (annotations.get(k, "") for k in (POD_NAMESPACE, POD_NAME, CONTAINER_NAME))
    parts = [pod_namespace, pod, container] if pod and container else [namespace, container_id]
    return _valid(SEPARATOR.join(parts))


def _valid(raw: str) -> str:
    """`raw` when it is a valid key; else a cleaned, bounded form of it with a hash of `raw` appended."""
    cleaned = "".join(ch if ch in _ALPHABET else "-" for ch in raw)
    while ".." in cleaned:
        cleaned = cleaned.replace("..", "-.")
    cleaned = cleaned.lstrip(".")
    if cleaned == raw and 0 < len(raw) <= MAX_KEY_LENGTH:
        return validate_key(raw)
    digest = hashlib.sha256(raw.encode(errors="surrogatepass")).hexdigest()[:_HASH_CHARS]
    head = cleaned[:MAX_KEY_LENGTH - _HASH_CHARS - 1].rstrip(".")
    return validate_key(f"{head}-{digest}" if head else f"key-{digest}")
