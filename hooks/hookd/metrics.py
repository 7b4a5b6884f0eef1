"""hookd's Prometheus metrics (prometheus-client), served by a tiny asyncio HTTP server.

Updated on the event loop thread (timings are taken around run_blocking there).

  kybernate_hookd_step_duration_seconds{step}     histogram of successful driver steps
  kybernate_hookd_step_failures_total{step,error} failed driver steps by CUresult name
  kybernate_hookd_bytes_total{direction}          VRAM moved: device_to_host (checkpoint), host_to_device (restore)
  kybernate_hookd_requests_total{rpc,outcome}     RPCs by result (ok or the status name)
  kybernate_hookd_driver_calls_in_flight          blocking calls not returned yet
  kybernate_hookd_store_bytes_total{tier,operation}             bytes checkpointed (local) and uploaded (s3)
  kybernate_hookd_store_duration_seconds{tier,operation}        histogram: checkpoints, their pause, uploads
  kybernate_hookd_store_failures_total{tier,operation}          failed checkpoints and upload attempts
  kybernate_hookd_store_upload_backlog                          generations queued or uploading
  kybernate_hookd_standby_parked                  workloads parked by standby now
  kybernate_hookd_standby_parks_total{trigger,outcome}  parks (idle, arbiter, api) by result
  kybernate_hookd_standby_wakes_total{trigger,outcome}  wakes (connect, api, retry) by result
  kybernate_hookd_standby_wake_seconds{trigger}   histogram of successful wakes (containerd Resume)
  kybernate_hookd_standby_park_seconds            histogram of successful parks (containerd Pause)
  kybernate_hookd_standby_evictions_total         workloads the arbiter parked to make room for a wake

The endpoint stays our own asyncio server rather than prometheus-client's threaded one: it lives on the
daemon's event loop, bounds every read, and stops with the daemon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WAKE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
STEPS = ("lock", "checkpoint", "restore", "unlock")
DIRECTIONS = ("device_to_host", "host_to_device")
STORE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# (tier, operation) pairs that show, with zero counts, from the start.
STORE_SERIES = (("local", "checkpoint"), ("local", "pause"), ("s3", "upload"))

# No `_created` series: they double every counter's lines and no dashboard of ours reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in the library


class Metrics:
    """One registry per daemon (tests run several daemons in one process)."""

    def __init__(self, in_flight: Callable[[], int] = lambda: 0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._steps = Histogram("kybernate_hookd_step_duration_seconds",
                                "Duration of successful CUDA driver checkpoint steps.", ["step"],
                                buckets=STEP_BUCKETS, registry=self.registry)
        self._failures = Counter("kybernate_hookd_step_failures", "Failed CUDA driver steps by error.",
                                 ["step", "error"], registry=self.registry)
        self._bytes = Counter("kybernate_hookd_bytes",
                              "GPU memory moved by checkpoint (device_to_host) and restore (host_to_device).",
                              ["direction"], registry=self.registry)
        self._requests = Counter("kybernate_hookd_requests", "RPCs served, by outcome.", ["rpc", "outcome"],
                                 registry=self.registry)
        in_flight_gauge = Gauge("kybernate_hookd_driver_calls_in_flight",
                                "Blocking driver and NVML calls that have not returned.", registry=self.registry)
        in_flight_gauge.set_function(lambda: float(in_flight()))
        self._store_bytes = Counter("kybernate_hookd_store_bytes", "Bytes written into the store, per tier.",
                                    ["tier", "operation"], registry=self.registry)
        self._store_seconds = Histogram("kybernate_hookd_store_duration_seconds",
                                        "Duration of store operations (a checkpoint, its pause, an upload).",
                                        ["tier", "operation"], buckets=STORE_BUCKETS, registry=self.registry)
        self._store_failures = Counter("kybernate_hookd_store_failures", "Failed store operations, per tier.",
                                       ["tier", "operation"], registry=self.registry)
        self._store_backlog = Gauge("kybernate_hookd_store_upload_backlog",
                                    "Generations queued for upload or uploading (failed ones being retried too).",
                                    registry=self.registry)
        for tier, operation in STORE_SERIES:
            if operation != "pause":
                self._store_bytes.labels(tier=tier, operation=operation)
            self._store_seconds.labels(tier=tier, operation=operation)
            self._store_failures.labels(tier=tier, operation=operation)
        self._parked = Gauge("kybernate_hookd_standby_parked", "Workloads parked by standby now.",
                             registry=self.registry)
        self._parks = Counter("kybernate_hookd_standby_parks", "Parks by standby, by trigger and outcome.",
                              ["trigger", "outcome"], registry=self.registry)
        self._wakes = Counter("kybernate_hookd_standby_wakes", "Wakes by standby, by trigger and outcome.",
                              ["trigger", "outcome"], registry=self.registry)
        self._wake_seconds = Histogram("kybernate_hookd_standby_wake_seconds",
                                       "Duration of successful wakes (containerd Resume).", ["trigger"],
                                       buckets=WAKE_BUCKETS, registry=self.registry)
        self._park_seconds = Histogram("kybernate_hookd_standby_park_seconds",
                                       "Duration of successful parks (containerd Pause).", buckets=STEP_BUCKETS,
                                       registry=self.registry)
        self._evictions = Counter("kybernate_hookd_standby_evictions",
                                  "Workloads the VRAM arbiter parked to make room for a wake.", registry=self.registry)
        for step in STEPS:  # every step shows, with zero counts, from the start
            self._steps.labels(step=step)
        for direction in DIRECTIONS:
            self._bytes.labels(direction=direction)

    def step_done(self, step: str, seconds: float) -> None:
        self._steps.labels(step=step).observe(seconds)

    def step_failed(self, step: str, error: str) -> None:
        self._failures.labels(step=step, error=error).inc()

    def moved(self, direction: str, n: int) -> None:
        self._bytes.labels(direction=direction).inc(n)

    def request(self, rpc: str, outcome: str) -> None:
        self._requests.labels(rpc=rpc, outcome=outcome).inc()

    def store_transfer(self, tier: str, operation: str, n: int, seconds: float) -> None:
        self._store_bytes.labels(tier=tier, operation=operation).inc(n)
        self._store_seconds.labels(tier=tier, operation=operation).observe(seconds)

    def store_duration(self, tier: str, operation: str, seconds: float) -> None:
        self._store_seconds.labels(tier=tier, operation=operation).observe(seconds)

    def store_failure(self, tier: str, operation: str) -> None:
        self._store_failures.labels(tier=tier, operation=operation).inc()

    def store_upload_backlog(self, n: int) -> None:
        self._store_backlog.set(n)
    def standby_parked(self, n: int) -> None:
        self._parked.set(n)

    def standby_park(self, trigger: str, outcome: str, seconds: float | None = None) -> None:
        self._parks.labels(trigger=trigger, outcome=outcome).inc()
        if seconds is not None:
            self._park_seconds.observe(seconds)

    def standby_wake(self, trigger: str, outcome: str, seconds: float | None = None) -> None:
        self._wakes.labels(trigger=trigger, outcome=outcome).inc()
        if seconds is not None:
            self._wake_seconds.labels(trigger=trigger).observe(seconds)

    def standby_evicted(self) -> None:
        self._evictions.inc()

    def render(self) -> str:
        """The text exposition format (version 0.0.4)."""
        return generate_latest(self.registry).decode()


def parse_address(address: str) -> tuple[str, int]:
    """"127.0.0.1:9464" or "[::1]:9464" -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r}: want HOST:PORT, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve(metrics: Metrics, address: str) -> asyncio.Server:
    """Plain HTTP/1.0-style: GET /metrics (and /healthz); one request per connection."""
    host, port = parse_address(address)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)).strip():
                pass  # headers: nothing we need
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", "GET only\n", "text/plain"
            elif path == "/metrics":
                status, body, ctype = "200 OK", metrics.render(), CONTENT_TYPE_PLAIN_0_0_4
            elif path == "/healthz":
                status, body, ctype = "200 OK", "ok\n", "text/plain"
            else:
                status, body, ctype = "404 Not Found", "try /metrics\n", "text/plain"
            data = body.encode()
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                    "Connection: close\r\n\r\n")
            writer.write(head.encode() + (data if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError) as err:
            log.debug("metrics request dropped", extra={"fields": {"error": repr(err)}})
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    return server
