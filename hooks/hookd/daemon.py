"""kybernate-hookd: the node daemon. `main()` parses flags, serves gRPC on a root-only unix socket,
serves Prometheus metrics, and stops gracefully on SIGTERM/SIGINT, naming whatever is stuck.

    kybernate-hookd [--socket /run/kybernate/hookd.sock] [--backend ctypes|binary] [--libcuda PATH]
                    [--cuda-checkpoint PATH] [--libnvml PATH] [--metrics-address 127.0.0.1:9464]
                    [--log-level info] [--intent-dir /run/kybernate/intent] [--reconcile-period-s 10]
                    [--store-root /var/lib/kybernate/store] [--store-registry /var/lib/kybernate/registry.db]
                    [--containerd-address /run/containerd/containerd.sock] [--store-keep 3] [--store-budget 0]
                    [--s3-bucket B] [--s3-endpoint URL] [--s3-prefix P] [--s3-region R]

The S3 flags default to $KYBERNATE_S3_BUCKET, $KYBERNATE_S3_ENDPOINT, $KYBERNATE_S3_PREFIX, $KYBERNATE_S3_REGION;
credentials come from the standard AWS chain (docs/store.md).
                    [--standby [--standby-* ...]]   (docs/standby.md)
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from kybernate.hooks.api import logs
from kybernate.hooks.api.errors import KybernateError
from kybernate.hooks.gpu import blocking
from kybernate.hooks.gpu.blocking import run_blocking
from kybernate.hooks.gpu.cuda import CheckpointDriver
from kybernate.hooks.gpu.nvml import Nvml

from . import metrics
from .manager import GpuManager
from .policy import settings as standby_settings
from .policy.controller import Controller
from .reconcile import Reconciler
from .reconcile_settings import ReconcileSettings
from .settings import DriverSettings, ManagerSettings, ServerSettings, Settings, StoreSettings
from .store.checkpoints import StoreCheckpoints
from .store.service import StoreService
from .store.uploads import Uploader

log = logging.getLogger(__name__)


class StartError(Exception):
    """hookd cannot start; the message says why and what to do."""


def parse_args(argv: list[str] | None = None) -> Settings:
    d, s, m, r, st = DriverSettings(), ServerSettings(), ManagerSettings(), ReconcileSettings(), StoreSettings()
    p = argparse.ArgumentParser(prog="kybernate-hookd",
                                description="Kybernate node daemon: CUDA checkpoint steps for the shim.")
    p.add_argument("--socket", default=s.socket, help="unix socket to serve on (root only, mode 0600) [%(default)s]")
    p.add_argument("--backend", choices=("ctypes", "binary"), default=d.backend,
                   help="ctypes: libcuda in-process; binary: exec cuda-checkpoint per step [%(default)s]")
    p.add_argument("--libcuda", default=d.libcuda, help="CUDA driver library for --backend ctypes [%(default)s]")
    p.add_argument("--cuda-checkpoint", default=d.cuda_checkpoint,
                   help="cuda-checkpoint for --backend binary [%(default)s]")
    p.add_argument("--libnvml", default=d.libnvml, help="libnvidia-ml path [the loader's libnvidia-ml.so.1]")
    p.add_argument("--metrics-address", default=s.metrics_address,
                   help="HOST:PORT for /metrics; empty disables [%(default)s]")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--lock-timeout-ms", type=int, default=m.default_lock_timeout_ms,
                   help="lock timeout when a request gives none, ms [%(default)s]")
    p.add_argument("--max-parallel", type=int, default=m.max_parallel, help="driver calls at once [%(default)s]")
    p.add_argument("--max-parallel-per-request", type=int, default=m.max_parallel_per_request,
                   help="driver calls one request may have at once [%(default)s]")
    p.add_argument("--max-pids-per-request", type=int, default=m.max_pids_per_request,
                   help="pids one request may name [%(default)s]")
    p.add_argument("--max-request-bytes", type=int, default=s.max_request_bytes,
                   help="largest request message, bytes [%(default)s]")
    p.add_argument("--restore-vram-headroom-bytes", type=int, default=m.restore_vram_headroom_bytes,
                   help="extra free VRAM a restore target must have, bytes per GPU [%(default)s]")
    p.add_argument("--shutdown-grace-s", type=float, default=s.shutdown_grace_s,
                   help="seconds in-flight requests get on SIGTERM [%(default)s]")
    p.add_argument("--stop-timeout-s", type=float, default=s.stop_timeout_s,
                   help="then seconds to wait for driver calls still running [%(default)s]")
    p.add_argument("--intent-dir", default=r.intent_dir,
                   help="where shims record each GPU task's desired GPU state ([kybernate] intent_dir) [%(default)s]")
    p.add_argument("--reconcile-period-s", type=float, default=r.period_s,
                   help="seconds between reconcile passes over the intent files; 0: at start only [%(default)s]")
    env = os.environ
    p.add_argument("--store-root", default=env.get("KYBERNATE_STORE") or st.root,
                   help="the checkpoint store's local root ($KYBERNATE_STORE) [%(default)s]")
    p.add_argument("--store-registry", default=env.get("KYBERNATE_REGISTRY") or st.registry,
                   help="the store's SQLite index ($KYBERNATE_REGISTRY) [%(default)s]")
    p.add_argument("--containerd-address", default=st.containerd_address,
                   help="containerd's socket, as containerd gives it to its shims: store checkpoints and "
                        "standby's parks and wakes go through it [%(default)s]")
    p.add_argument("--store-max-parallel", type=int, default=st.max_parallel,
                   help="store checkpoints at once on the node [%(default)s]")
    p.add_argument("--store-keep", type=int, default=int(env.get("KYBERNATE_KEEP") or st.keep),
                   help="generations kept per key ($KYBERNATE_KEEP) [%(default)s]")
    p.add_argument("--store-budget", type=int, default=st.budget_bytes,
                   help="local disk budget of the store in bytes; 0: none [%(default)s]")
    p.add_argument("--s3-bucket", default=env.get("KYBERNATE_S3_BUCKET", ""), help="S3 tier's bucket; empty: off")
    p.add_argument("--s3-endpoint", default=env.get("KYBERNATE_S3_ENDPOINT", ""),
                   help="S3-compatible endpoint URL; empty: AWS's")
    p.add_argument("--s3-prefix", default=env.get("KYBERNATE_S3_PREFIX", ""), help="prefix inside the bucket")
    p.add_argument("--s3-region", default=env.get("KYBERNATE_S3_REGION") or env.get("AWS_REGION")
                   or env.get("AWS_DEFAULT_REGION") or "us-east-1", help="signing region [%(default)s]")
    p.add_argument("--upload-max-parallel", type=int, default=st.max_parallel_uploads,
                   help="generations uploaded at once [%(default)s]")
    p.add_argument("--upload-retry-max-s", type=float, default=st.upload_retry_max_s,
                   help="longest wait between attempts of a failed upload, seconds [%(default)s]")
    p.add_argument("--upload-rescan-s", type=float, default=st.upload_rescan_s,
                   help="how often the upload queue is looked at for uploads queued while hookd runs (a `kybernate "
                   "store rebuild`), seconds; 0: only at start [%(default)s]")
    add_standby_flags(p)
    a = p.parse_args(argv)
    if min(a.store_max_parallel, a.store_keep, a.upload_max_parallel) < 1:
        p.error("--store-max-parallel, --store-keep and --upload-max-parallel must be at least 1")
    if a.store_budget < 0 or a.upload_retry_max_s <= 0 or a.upload_rescan_s < 0:
        p.error("--store-budget and --upload-rescan-s must be at least 0 and --upload-retry-max-s above 0")
    try:
        standby = standby_from_flags(a)
    except standby_settings.PolicyError as err:
        p.error(str(err))
    if min(a.max_parallel, a.max_parallel_per_request, a.max_pids_per_request) < 1:
        p.error("--max-parallel, --max-parallel-per-request and --max-pids-per-request must be at least 1")
    if a.max_request_bytes < 4096:
        p.error("--max-request-bytes must be at least 4096")
    if a.metrics_address:
        try:
            metrics.parse_address(a.metrics_address)
        except ValueError as err:
            p.error(str(err))
    return Settings(
        server=replace(s, socket=a.socket, metrics_address=a.metrics_address, shutdown_grace_s=a.shutdown_grace_s,
                       stop_timeout_s=a.stop_timeout_s, max_request_bytes=a.max_request_bytes),
        driver=replace(d, backend=a.backend, libcuda=a.libcuda, cuda_checkpoint=a.cuda_checkpoint, libnvml=a.libnvml),
        manager=replace(m, default_lock_timeout_ms=a.lock_timeout_ms, max_parallel=a.max_parallel,
                        max_parallel_per_request=a.max_parallel_per_request,
                        max_pids_per_request=a.max_pids_per_request,
                        restore_vram_headroom_bytes=a.restore_vram_headroom_bytes),
        log_level=a.log_level,
        reconcile=replace(r, intent_dir=a.intent_dir, period_s=max(0.0, a.reconcile_period_s)),
        store=replace(st, root=a.store_root, registry=a.store_registry, containerd_address=a.containerd_address,
                      max_parallel=a.store_max_parallel, keep=a.store_keep, budget_bytes=a.store_budget,
                      s3_bucket=a.s3_bucket, s3_endpoint=a.s3_endpoint, s3_prefix=a.s3_prefix, s3_region=a.s3_region,
                      max_parallel_uploads=a.upload_max_parallel,
                      upload_retry_max_s=a.upload_retry_max_s, upload_rescan_s=a.upload_rescan_s,
                      upload_retry_first_s=min(st.upload_retry_first_s, a.upload_retry_max_s)),
        standby=standby,
    )


def add_standby_flags(p: argparse.ArgumentParser) -> None:
    s, d = standby_settings.StandbySettings(), standby_settings.Policy()
    g = p.add_argument_group("standby", "scale-to-zero and multiplexing (docs/standby.md)")
    g.add_argument("--standby", action="store_true", help="park idle workloads and wake them on demand")
    g.add_argument("--standby-default", choices=("off", "on"), default="on" if d.enabled else "off",
                   help="park workloads without kybernate.io/standby when idle [%(default)s]")
    g.add_argument("--standby-idle", default=f"{d.idle_s:.0f}s",
                   help="default idle period before parking, e.g. 300, 90s, 5m [%(default)s]")
    g.add_argument("--standby-tier", default=d.tier, help="default tier: ram [%(default)s]")
    g.add_argument("--standby-wake", default=d.wake, help="default wake: connect or api [%(default)s]")
    g.add_argument("--standby-priority", default=str(d.priority), help="default priority 0..1000 [%(default)s]")
    g.add_argument("--standby-sample-period-s", type=float, default=s.sample_period_s,
                   help="seconds between samples of the idle signals [%(default)s]")
    g.add_argument("--standby-cpu-idle-cores", type=float, default=s.cpu_idle_cores,
                   help="a cgroup below this many cores is CPU-idle [%(default)s]")
    g.add_argument("--standby-gpu-idle-percent", type=int, default=s.gpu_idle_percent,
                   help="a process above this GPU utilisation is GPU-active [%(default)s]")
    g.add_argument("--standby-watch-period-s", type=float, default=s.watch_period_s,
                   help="seconds between looks at a parked workload's listening sockets [%(default)s]")
    g.add_argument("--standby-busy-window-s", type=float, default=s.busy_window_s,
                   help="traffic this recent keeps the arbiter from parking a workload [%(default)s]")
    g.add_argument("--standby-gpu-budget", action="append", default=[], metavar="GPU-UUID=BYTES",
                   help="VRAM budget of a GPU below its size (BYTES, or with Mi/Gi); repeatable")
    g.add_argument("--standby-max-parallel-wakes", type=int, default=s.max_parallel_wakes,
                   help="wakes in flight on the node at once [%(default)s]")
    g.add_argument("--standby-state-dir", default=s.state_dir,
                   help="where hookd records its parks across restarts [%(default)s]")
    g.add_argument("--standby-ram-budget", default="0", metavar="BYTES",
                   help="host RAM the RAM-parked workloads may hold together (Mi/Gi); above it the least "
                        "recently parked are demoted to disk; 0: no limit [%(default)s]")
    g.add_argument("--standby-retry-s", type=float, default=s.retry_s,
                   help="seconds before a failed park or wake is tried again (doubling) [%(default)s]")
    g.add_argument("--standby-start-hold-s", type=float, default=s.start_hold_s,
                   help="seconds the room made for a starting container is held for it until it uses it "
                        "[%(default)s]")


def standby_from_flags(a: argparse.Namespace) -> standby_settings.StandbySettings:
    m = standby_settings
    defaults = m.Policy(enabled=a.standby_default == "on", idle_s=m.parse_duration("--standby-idle", a.standby_idle),
                        tier=m.parse_tier("--standby-tier", a.standby_tier),
                        wake=m.parse_wake("--standby-wake", a.standby_wake),
                        priority=m.parse_priority("--standby-priority", a.standby_priority))
    for flag, value, low in (("--standby-sample-period-s", a.standby_sample_period_s, 0.01),
                             ("--standby-watch-period-s", a.standby_watch_period_s, 0.001),
                             ("--standby-retry-s", a.standby_retry_s, 0.01),
                             ("--standby-start-hold-s", a.standby_start_hold_s, 0.0)):
        if not low <= value <= 3600:
            raise m.PolicyError(f"{flag}={value}: want {low} to 3600 seconds")
    if a.standby_max_parallel_wakes < 1:
        raise m.PolicyError("--standby-max-parallel-wakes must be at least 1")
    return m.StandbySettings(
        enabled=a.standby, containerd_address=a.containerd_address, defaults=defaults,
        sample_period_s=a.standby_sample_period_s, cpu_idle_cores=a.standby_cpu_idle_cores,
        gpu_idle_percent=a.standby_gpu_idle_percent, watch_period_s=a.standby_watch_period_s,
        busy_window_s=a.standby_busy_window_s, gpu_budget_bytes=m.parse_budgets(a.standby_gpu_budget),
        max_parallel_wakes=a.standby_max_parallel_wakes, state_dir=a.standby_state_dir, retry_s=a.standby_retry_s,
        ram_budget_bytes=m.parse_bytes("--standby-ram-budget", a.standby_ram_budget),
        start_hold_s=a.standby_start_hold_s)


def open_driver(settings: DriverSettings, transfer_timeout_s: float) -> CheckpointDriver:
    """Blocking (cuInit can take seconds): call through run_blocking."""
    if settings.backend == "binary":
        from kybernate.hooks.gpu.binary import CudaCheckpointBinary

        return CudaCheckpointBinary(settings.cuda_checkpoint, step_timeout_s=transfer_timeout_s)
    from kybernate.hooks.gpu.cuda import CudaDriver

    return CudaDriver(settings.libcuda)


def lock_instance(socket_path: str) -> int:
    """Hold an exclusive lock beside the socket for the daemon's life: one hookd per socket, even when two
    start at once (both would find no socket; the second bind would silently take it over)."""
    directory = os.path.dirname(os.path.abspath(socket_path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd = os.open(socket_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartError(f"another kybernate-hookd is already serving {socket_path} (it holds {socket_path}.lock): "
                         "stop it first (systemctl stop kybernate-hookd)") from None
    return fd


def prepare_socket(path: str) -> None:
    """A 0700 directory (created if missing) and no stale socket; refuse if another hookd answers there."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
    elif os.stat(directory).st_mode & 0o077:
        log.warning("socket directory is open to other users; the socket itself stays 0600",
                    extra={"fields": {"dir": directory, "mode": oct(os.stat(directory).st_mode & 0o777)}})
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartError(f"{path} exists and is not a socket: remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # left by a hookd that died: nobody listens
        return
    finally:
        probe.close()
    raise StartError(f"another kybernate-hookd is already serving {path}: "
                     "stop it first (systemctl stop kybernate-hookd)")


class Daemon:
    """The running daemon: driver, NVML, manager, gRPC server and metrics server."""

    def __init__(self, settings: Settings, driver: CheckpointDriver | None = None) -> None:
        self.settings = settings
        self.metrics = metrics.Metrics(in_flight=lambda: len(blocking.in_flight()))
        self._driver = driver
        # Driver calls are capped at max_parallel by the manager's semaphore; two threads more keep NVML
        # (Health, the inventory) from queueing behind them.
        self._executor = ThreadPoolExecutor(max_workers=settings.manager.max_parallel + 2,
                                            thread_name_prefix="hookd-driver")
        self._nvml = Nvml(settings.driver.libnvml)
        self._server: Any = None
        self._metrics_server: asyncio.Server | None = None
        self._bound = False  # the socket file is ours to remove
        self._instance_lock: int | None = None
        self._reconciling: asyncio.Task[None] | None = None
        self._standby_task: asyncio.Task[None] | None = None
        self.standby: Controller | None = None
        self.manager: GpuManager | None = None
        self.reconciler: Reconciler | None = None
        # The store's blocking work (containerd's gRPC, files, hashing, SQLite): apart from the driver's threads,
        # so that a long rootfs diff never delays a pause. Each checkpoint has at most two calls in flight.
        self._store_executor = ThreadPoolExecutor(max_workers=2 * settings.store.max_parallel + 2,
                                                  thread_name_prefix="hookd-store")
        self.store: StoreCheckpoints | None = None
        self.uploads: Uploader | None = None
        self._store_service: StoreService | None = None

    @property
    def metrics_port(self) -> int | None:
        if self._metrics_server is None or not self._metrics_server.sockets:
            return None
        return int(self._metrics_server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        import grpc

        from kybernate.api import hookd_pb2_grpc, store_pb2_grpc

        from .service import HookdService

        s = self.settings
        self._instance_lock = lock_instance(s.server.socket)
        if self._driver is None:
            try:
                self._driver = await run_blocking(open_driver, s.driver, s.manager.transfer_timeout_s,
                                                  what="driver init", executor=self._executor)
            except KybernateError as err:
                raise StartError(err.message) from err
        await run_blocking(self._nvml.start, what="nvml init", executor=self._executor)
        self.manager = GpuManager(self._driver, self._nvml, s.manager, self.metrics, self._executor)
        health = await self.manager.health()
        prepare_socket(s.server.socket)
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", s.server.max_request_bytes),
            # The shim pings while a long call runs (HookdClient): allow it, without strikes.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", s.server.min_ping_interval_ms),
            ("grpc.http2.min_ping_interval_without_data_ms", s.server.min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", 0),
        ])
        add_servicer: Callable[[Any, Any], None] = hookd_pb2_grpc.add_HookdServicer_to_server  # unannotated, generated
        add_servicer(HookdService(self.manager, self.metrics), self._server)
        self.uploads = Uploader(s.store, self.metrics)
        self.store = StoreCheckpoints(s.store, self._store_executor, self.uploads, self.metrics)
        self._store_service = StoreService(self.store, self.metrics)
        add_store: Callable[[Any, Any], None] = store_pb2_grpc.add_StoreServicer_to_server  # generated
        add_store(self._store_service, self._server)
        if s.standby.enabled:
            from .policy.executor import Executor as StandbyExecutor

            executor = StandbyExecutor(s.standby.containerd_address, s.standby.containerd_timeout_s, store=self.store)
            self.standby = Controller(s.standby, s.reconcile.intent_dir, self._nvml, self.metrics, executor,
                                      overrides=self.manager.overrides)
        from kybernate.api import standby_pb2_grpc

        from .policy.service import StandbyService

        add_standby: Callable[[Any, Any], None] = standby_pb2_grpc.add_StandbyServicer_to_server
        add_standby(StandbyService(self.standby, self.metrics), self._server)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others could connect
        try:
            self._server.add_insecure_port(f"unix:{s.server.socket}")
            await self._server.start()
            self._bound = True
        finally:
            os.umask(old_umask)
        os.chmod(s.server.socket, 0o600)
        if s.server.metrics_address:
            self._metrics_server = await metrics.serve(self.metrics, s.server.metrics_address)
        # At start and then periodically: GPU state a crash left stranded goes back where the intent says.
        self.reconciler = Reconciler(self.manager, s.reconcile, self.metrics)
        self._reconciling = asyncio.create_task(self.reconciler.run(), name="reconcile")
        resumed = await self.uploads.resume()  # uploads a previous hookd left queued, failed or half done
        if self.standby is not None:
            self._standby_task = asyncio.create_task(self.standby.run(), name="standby")
        log.info("serving", extra={"fields": {
            "socket": s.server.socket, "backend": health.backend, "driver": health.driver_version,
            "cuda": health.cuda_version, "nvml": health.nvml, "gpus": len(health.gpus),
            "metrics": f"127.0.0.1:{self.metrics_port}" if self.metrics_port else "off", "pid": os.getpid(),
            "store": s.store.root, "s3": self.uploads.config.where if self.uploads.config else "off",
            "uploads_resumed": resumed,
            "standby": "on" if self.standby is not None else "off"}})

    async def stop(self) -> int:
        """Graceful stop; 0 when everything finished, 1 when driver calls are still running (named in the log)."""
        s = self.settings.server
        loop = asyncio.get_running_loop()
        log.info("stopping", extra={"fields": {"grace_s": s.shutdown_grace_s}})
        for task in (self._reconciling, self._standby_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._server is not None:
            await self._server.stop(grace=s.shutdown_grace_s)  # then in-flight handlers are cancelled
        if self._store_service is not None:
            # Checkpoints run as tasks of their own, bounded by their deadlines: a half-done one is rolled back
            # or committed by its own code, never abandoned.
            await self._store_service.wait_running(s.stop_timeout_s)
        if self.uploads is not None:
            await self.uploads.stop()  # resumed by the next hookd
        deadline = loop.time() + s.stop_timeout_s
        while loop.time() < deadline:
            busy = (self.manager.busy() if self.manager else []) + [
                f"{c.what} for {c.age():.1f} s" for c in blocking.in_flight()]
            if not busy:
                break
            log.warning("waiting for work in progress", extra={"fields": {"busy": "; ".join(busy)}})
            await asyncio.sleep(min(2.0, max(0.0, deadline - loop.time())))
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        if self._bound:
            try:
                os.unlink(s.socket)
            except FileNotFoundError:
                pass
        if self._instance_lock is not None:
            os.close(self._instance_lock)  # the lock file stays: removing it would race a starting hookd
            self._instance_lock = None
        stuck = blocking.in_flight()
        if stuck:
            log.error("exiting with driver calls still running; their processes may be left LOCKED or CHECKPOINTED",
                      extra={"fields": {"calls": "; ".join(f"{c.what} for {c.age():.1f} s" for c in stuck)}})
            self._executor.shutdown(wait=False, cancel_futures=True)
            return 1
        self._nvml.close()
        if self._driver is not None:
            self._driver.close()
        self._executor.shutdown(wait=True)
        self._store_executor.shutdown(wait=True)
        log.info("stopped")
        return 0


async def run(settings: Settings) -> int:
    daemon = Daemon(settings)
    try:
        await daemon.start()
    except StartError as err:
        log.error("cannot start", extra={"fields": {"error": str(err)}})
        await daemon.stop()
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    return await daemon.stop()


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    logs.setup(settings.log_level)
    code = asyncio.run(run(settings))
    if code == 1:
        # Worker threads are still inside the driver; the interpreter would wait for them forever.
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
