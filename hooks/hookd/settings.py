"""kybernate-hookd settings: plain dataclasses, every field with its unit. Flags map onto them in daemon.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from kybernate.hooks.api import DEFAULT_SOCKET

from .policy.settings import StandbySettings
from .reconcile_settings import ReconcileSettings


@dataclass(frozen=True, slots=True)
class ServerSettings:
    # Unix socket the shim connects to. Its directory is created mode 0700, the socket mode 0600: root only.
    socket: str = DEFAULT_SOCKET
    # Prometheus endpoint as HOST:PORT (plain HTTP, GET /metrics). Empty: no metrics server.
    metrics_address: str = "127.0.0.1:9464"
    # On SIGTERM/SIGINT, seconds in-flight RPCs get to finish before they are cancelled.
    shutdown_grace_s: float = 30.0
    # After that, seconds to wait for driver calls still running (they cannot be interrupted) before
    # exiting anyway with status 1, naming each one in the log.
    stop_timeout_s: float = 60.0
    # Largest request message accepted, in bytes; a larger one is refused RESOURCE_EXHAUSTED by gRPC
    # before it is decoded. A request with max_pids_per_request pids and a manifest of as many
    # processes is about 0.4 MiB.
    max_request_bytes: int = 1 << 20
    # HTTP/2 keepalive pings from clients are allowed this often, in milliseconds: the shim pings while
    # it waits for a long checkpoint, to notice a daemon that stopped answering (see HookdClient).
    min_ping_interval_ms: int = 1_000


@dataclass(frozen=True, slots=True)
class DriverSettings:
    # "ctypes": libcuda in-process, initialised once (fast). "binary": exec cuda-checkpoint per step.
    backend: str = "ctypes"
    # The CUDA driver library for the ctypes backend: a soname for the loader's search, or a path.
    libcuda: str = "libcuda.so.1"
    # The cuda-checkpoint executable for the binary backend: a name looked up in PATH, or a path.
    cuda_checkpoint: str = "cuda-checkpoint"
    # libnvidia-ml for the GPU inventory; empty: nvidia-ml-py's own lookup of libnvidia-ml.so.1.
    libnvml: str = ""


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    # Lock timeout when the request gives 0, in milliseconds: how long a lock may wait for the
    # process's submitted GPU work to finish.
    default_lock_timeout_ms: int = 10_000
    # Extra seconds hookd waits beyond the lock timeout for the driver's lock call to return before
    # it reports DEADLINE_EXCEEDED (the driver ignores the timeout while the target is stopped).
    lock_grace_s: float = 5.0
    # Seconds to wait for a state query or an unlock (both take about a millisecond normally).
    query_timeout_s: float = 30.0
    # Seconds to wait for one process's checkpoint or restore (VRAM <-> host RAM: measured 1.6-5.5 GB/s,
    # so 600 s covers well over 500 GiB per process).
    transfer_timeout_s: float = 600.0
    # Driver calls in flight at once on the node (threads, and a semaphore in front of them). The steps
    # are CPU-bound per target process and scale across processes, so allow at least one per CUDA
    # process of the largest container.
    max_parallel: int = 32
    # Seconds a forked child of a CUDA process gets to stop for ptrace so that the GPU device files it
    # inherited can be dropped (it normally stops in microseconds; see hooks/gpu/inherited.py).
    inherited_timeout_s: float = 10.0
    # Driver calls one request may have in flight at once (count). Below max_parallel, so that a
    # container with many processes leaves room for another container's pause: the other waits for
    # at most one driver call, not for the whole container.
    max_parallel_per_request: int = 16
    # Pids one request may name or its cgroup may hold (count). More is refused RESOURCE_EXHAUSTED
    # before any driver call: every pid costs a task and a driver query (300k pids once took 2.6 GB
    # and held up another container's pause for 100 s).
    max_pids_per_request: int = 4096
    # Bytes a target GPU must have free on top of what the checkpoint held there, per GPU.
    restore_vram_headroom_bytes: int = 0


@dataclass(frozen=True, slots=True)
class StoreSettings:
    # The local store's root (0700, root only) and its SQLite index; the CLI's `kybernate ls` reads the same.
    root: str = "/var/lib/kybernate/store"
    registry: str = "/var/lib/kybernate/registry.db"
    # containerd's socket as containerd gives it to its shims: our shim's socket address is derived from it.
    containerd_address: str = "/run/containerd/containerd.sock"
    # Store checkpoints running at once on the node (count); more wait for a slot within their deadline.
    max_parallel: int = 2
    # Seconds a checkpoint may take when the request gives no deadline (deadline_ms 0).
    default_deadline_s: float = 3600.0
    # Generations kept per key (at least 1), and the local disk budget in bytes (0: none).
    keep: int = 3
    budget_bytes: int = 0
    # The S3 tier: off without a bucket. Endpoint: any S3-compatible URL (empty: AWS's). Prefix: inside the bucket.
    s3_bucket: str = ""
    s3_endpoint: str = ""
    s3_prefix: str = ""
    s3_region: str = ""
    # Uploads running at once (count), each with the S3 tier's own per-file and per-part parallelism.
    max_parallel_uploads: int = 2
    # Backoff between attempts of a failed upload, seconds: doubling from the first to the cap, forever.
    upload_retry_first_s: float = 1.0
    upload_retry_max_s: float = 300.0
    # How often the upload queue (the registry) is looked at for rows queued behind hookd's back (a `kybernate
    # store rebuild`), seconds; 0: only at start.
    upload_rescan_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    driver: DriverSettings = field(default_factory=DriverSettings)
    manager: ManagerSettings = field(default_factory=ManagerSettings)
    # Python logging level name: debug, info, warning, error.
    log_level: str = "info"
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    # Scale-to-zero and multiplexing (docs/standby.md); off unless --standby.
    standby: StandbySettings = field(default_factory=StandbySettings)
