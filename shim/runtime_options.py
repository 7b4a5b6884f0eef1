"""Runtime options: what containerd hands the shim, turned into what the runc shim understands.

containerd sends options as a protobuf Any, on `start`'s stdin and in CreateTaskRequest.options.
- CRI (and `ctr --runtime-config-path`) send `runtimeoptions.v1.Options`: a path to, or the body of, a
  TOML file. The stock runc shim casts options blindly and would fail on it, so we read the TOML and
  build `containerd.runc.v1.Options` from it.
- `containerd.runc.v1.Options` (from a caller that already speaks runc) passes through unchanged.

The TOML file holds runc's keys at the top level, spelled as in containerd's own runc options
(`BinaryName`, `Root`, `SystemdCgroup`, ...), and Kybernate's own settings under `[kybernate]`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import any_pb2

from kybernate.api import runc_options_pb2, runtimeoptions_pb2
from kybernate.hooks.api import DEFAULT_SOCKET

from . import criu_config

RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
CRI_OPTIONS_TYPE = "runtimeoptions.v1.Options"

# TOML key -> (protobuf field, python type). Spelling follows containerd's runc options table.
RUNC_KEYS: dict[str, tuple[str, type]] = {
    "NoPivotRoot": ("no_pivot_root", bool),
    "NoNewKeyring": ("no_new_keyring", bool),
    "ShimCgroup": ("shim_cgroup", str),
    "IoUid": ("io_uid", int),
    "IoGid": ("io_gid", int),
    "BinaryName": ("binary_name", str),
    "Root": ("root", str),
    "CriuPath": ("criu_path", str),
    "SystemdCgroup": ("systemd_cgroup", bool),
    "CriuImagePath": ("criu_image_path", str),
    "CriuWorkPath": ("criu_work_path", str),
}

# The node's defaults, used when containerd passes no options (ctr, or a CRI runtime without ConfigPath).
NODE_CONFIG_ENV = "KYBERNATE_CONFIG"
DEFAULT_NODE_CONFIG = "/etc/kybernate/runtime.toml"


class OptionsError(ValueError):
    """Runtime options that cannot be understood; the message says which and why."""


@dataclass(frozen=True, slots=True)
class KybernateOptions:
    """Kybernate's own settings from the `[kybernate]` table; annotations may override per pod."""

    hookd_socket: str = DEFAULT_SOCKET
    # How long the driver may wait for submitted GPU work before a lock gives up, in milliseconds.
    lock_timeout_ms: int = 10_000
    # Whether a plain Pause (not part of a checkpoint) moves VRAM to host memory (hot standby).
    pause_releases_vram: bool = True
    # Upper bound for one hookd call (checkpoint or restore of all GPU processes), in seconds.
    hookd_timeout_s: float = 600.0
    # The only directory `kybernate.io/restore-from` archives are read from.
    checkpoint_dir: str = "/var/lib/kybernate/checkpoints"
    # CRIU options added to Kybernate's own ones (link-remap) for this runtime's containers, one long
    # option per entry without dashes, e.g. ["ghost-limit 16M"]; see docs/real-programs.md.
    criu_options: tuple[str, ...] = ()
    # Where the shim records each GPU task's desired GPU state (docs/lifecycle.md); kybernate-hookd's
    # --intent-dir must name the same directory for its reconciler to find them.
    intent_dir: str = "/run/kybernate/intent"
    # How long a checkpoint-on-stop may take (kybernate.io/checkpoint-on-stop-timeout overrides it per pod), in
    # seconds. The runtime is not told the pod's grace period: set it below terminationGracePeriodSeconds
    # (Kubernetes' default is 30 s), docs/resilience.md.
    checkpoint_on_stop_timeout_s: float = 20.0


KYBERNATE_KEYS: dict[str, type] = {
    "hookd_socket": str,
    "lock_timeout_ms": int,
    "pause_releases_vram": bool,
    "hookd_timeout_s": float,
    "checkpoint_dir": str,
    "criu_options": list,
    "intent_dir": str,
    "checkpoint_on_stop_timeout_s": float,
}
# Bounds of the [kybernate] numbers that have them: (smallest, largest).
KYBERNATE_RANGES: dict[str, tuple[float, float]] = {
    "checkpoint_on_stop_timeout_s": (1.0, 3600.0),
}


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """The runc options to hand on (None: none were given) and Kybernate's own settings."""

    runc: runc_options_pb2.Options | None = None
    kybernate: KybernateOptions = field(default_factory=KybernateOptions)

    def runc_any_bytes(self) -> bytes:
        """Serialized Any for the runc shim's stdin or CreateTaskRequest.options; empty when none."""
        if self.runc is None:
            return b""
        return any_pb2.Any(type_url=RUNC_OPTIONS_TYPE, value=self.runc.SerializeToString()).SerializeToString()

    def runc_any(self) -> any_pb2.Any | None:
        if self.runc is None:
            return None
        return any_pb2.Any(type_url=RUNC_OPTIONS_TYPE, value=self.runc.SerializeToString())


def bare_type(type_url: str) -> str:
    """`type.googleapis.com/x.y.Z` and `x.y.Z` alike: containerd sends bare names, others prefixed."""
    return type_url.rsplit("/", 1)[-1]


def from_any(options: any_pb2.Any | None) -> RuntimeConfig:
    if options is None or (not options.type_url and not options.value):
        return RuntimeConfig()
    kind = bare_type(options.type_url)
    if kind == RUNC_OPTIONS_TYPE:
        # containerd speaks runc to us when the runtime is registered as io.containerd.runc.v2 with our
        # binary as runtime_path (containerd 2.x, so that it sees runc's features). The runc options go on
        # as given; Kybernate's own settings then come from the node's runtime.toml.
        runc = runc_options_pb2.Options()
        runc.ParseFromString(options.value)
        return RuntimeConfig(runc=runc, kybernate=node_default().kybernate)
    if kind == CRI_OPTIONS_TYPE:
        cri = runtimeoptions_pb2.Options()
        cri.ParseFromString(options.value)
        return from_cri_options(cri)
    raise OptionsError(
        f"runtime options of type {options.type_url!r} are not supported: "
        f"use {CRI_OPTIONS_TYPE} (a TOML file) or {RUNC_OPTIONS_TYPE}"
    )


def node_default() -> RuntimeConfig:
    """The node's runtime.toml ($KYBERNATE_CONFIG, else /etc/kybernate/runtime.toml); defaults if absent."""
    path = os.environ.get(NODE_CONFIG_ENV) or DEFAULT_NODE_CONFIG
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return RuntimeConfig()
    except OSError as err:
        raise OptionsError(f"cannot read the node's runtime options {path}: {err.strerror}") from err
    return from_toml(text, path)


def from_any_bytes(data: bytes) -> RuntimeConfig:
    """Options from `start`'s stdin; none means the node's defaults."""
    if not data:
        return node_default()
    wrapped = any_pb2.Any()
    try:
        wrapped.ParseFromString(data)
    except Exception as err:  # protobuf raises DecodeError, a plain Exception subclass
        raise OptionsError(f"runtime options are not a protobuf Any: {err}") from err
    return from_any(wrapped)


def from_cri_options(cri: runtimeoptions_pb2.Options) -> RuntimeConfig:
    if cri.config_body:
        text = bytes(cri.config_body).decode("utf-8", errors="replace")
        origin = "ConfigBody"
    elif cri.config_path:
        path = Path(cri.config_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise OptionsError(f"cannot read runtime options file {path}: {err.strerror}") from err
        origin = str(path)
    else:
        return RuntimeConfig()
    return from_toml(text, origin)


def from_toml(text: str, origin: str = "runtime options") -> RuntimeConfig:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise OptionsError(f"{origin}: not valid TOML: {err}") from err
    runc = runc_options_pb2.Options()
    for key, value in table.items():
        # containerd 2.x passes the whole options table as the body, its own keys included.
        if key in ("kybernate", "TypeUrl", "ConfigPath"):
            continue
        if key not in RUNC_KEYS:
            raise OptionsError(f"{origin}: unknown key {key!r}; known: {', '.join(sorted(RUNC_KEYS))}, [kybernate]")
        name, kind = RUNC_KEYS[key]
        setattr(runc, name, _typed(origin, key, value, kind))
    return RuntimeConfig(runc=runc, kybernate=kybernate_from_table(table.get("kybernate", {}), origin))


def kybernate_from_table(table: object, origin: str) -> KybernateOptions:
    if not isinstance(table, dict):
        raise OptionsError(f"{origin}: [kybernate] must be a table")
    values: dict[str, object] = {}
    for key, value in table.items():
        if key not in KYBERNATE_KEYS:
            raise OptionsError(
                f"{origin}: unknown key kybernate.{key}; known: {', '.join(sorted(KYBERNATE_KEYS))}"
            )
        values[key] = _typed(origin, f"kybernate.{key}", value, KYBERNATE_KEYS[key])
        low, high = KYBERNATE_RANGES.get(key, (0.0, 0.0))
        if key in KYBERNATE_RANGES and not low <= values[key] <= high:  # type: ignore[operator]
            raise OptionsError(f"{origin}: kybernate.{key} = {value!r} is out of range {low:g}..{high:g}")
    if "criu_options" in values:
        values["criu_options"] = _criu_options(origin, values["criu_options"])
    return KybernateOptions(**values)  # type: ignore[arg-type]


def _criu_options(origin: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OptionsError(f"{origin}: kybernate.criu_options must be a list of strings, not {value!r}")
    try:
        return criu_config.check_options(value, origin)
    except criu_config.CriuConfigError as err:
        raise OptionsError(str(err)) from err


def _typed(origin: str, key: str, value: object, kind: type) -> object:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise OptionsError(f"{origin}: {key} must be an integer, not {value!r}")
    if not isinstance(value, kind):
        raise OptionsError(f"{origin}: {key} must be {kind.__name__}, not {value!r}")
    if kind is int and not 0 <= value <= 0xFFFFFFFF:  # type: ignore[operator]
        raise OptionsError(f"{origin}: {key} out of range: {value!r}")
    return value
