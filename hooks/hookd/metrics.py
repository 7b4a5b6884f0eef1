"""Prometheus metrics in the text exposition format, served by a tiny asyncio HTTP server.

Updated on the event loop thread only (timings are taken around run_blocking there), so no locks.

  kybernate_hookd_step_duration_seconds{step}     histogram of successful driver steps
  kybernate_hookd_step_failures_total{step,error} failed driver steps by CUresult name
  kybernate_hookd_bytes_total{direction}          VRAM moved: device_to_host (checkpoint), host_to_device (restore)
  kybernate_hookd_requests_total{rpc,outcome}     RPCs by result (ok or the status name)
  kybernate_hookd_driver_calls_in_flight          blocking calls not returned yet
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEPS = ("lock", "checkpoint", "restore", "unlock")


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(STEP_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(STEP_BUCKETS, value)] += 1
        self.total += value
        self.n += 1


class Metrics:
    def __init__(self, in_flight: Callable[[], int] = lambda: 0) -> None:
        self._steps: dict[str, _Histogram] = {step: _Histogram() for step in STEPS}
        self._failures: dict[tuple[str, str], int] = {}
        self._bytes: dict[str, int] = {"device_to_host": 0, "host_to_device": 0}
        self._requests: dict[tuple[str, str], int] = {}
        self._in_flight = in_flight

    def step_done(self, step: str, seconds: float) -> None:
        self._steps.setdefault(step, _Histogram()).observe(seconds)

    def step_failed(self, step: str, error: str) -> None:
        key = (step, error)
        self._failures[key] = self._failures.get(key, 0) + 1

    def moved(self, direction: str, n: int) -> None:
        self._bytes[direction] = self._bytes.get(direction, 0) + n

    def request(self, rpc: str, outcome: str) -> None:
        key = (rpc, outcome)
        self._requests[key] = self._requests.get(key, 0) + 1

    def render(self) -> str:
        out = [
            "# HELP kybernate_hookd_step_duration_seconds Duration of successful CUDA driver checkpoint steps.",
            "# TYPE kybernate_hookd_step_duration_seconds histogram",
        ]
        for step, h in sorted(self._steps.items()):
            cumulative = 0
            for bound, count in zip((*STEP_BUCKETS, float("inf")), h.counts):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'kybernate_hookd_step_duration_seconds_bucket{{step="{step}",le="{le}"}} {cumulative}')
            out.append(f'kybernate_hookd_step_duration_seconds_sum{{step="{step}"}} {h.total:.6f}')
            out.append(f'kybernate_hookd_step_duration_seconds_count{{step="{step}"}} {h.n}')
        out += [
            "# HELP kybernate_hookd_step_failures_total Failed CUDA driver steps by error.",
            "# TYPE kybernate_hookd_step_failures_total counter",
        ]
        for (step, error), n in sorted(self._failures.items()):
            out.append(f'kybernate_hookd_step_failures_total{{step="{step}",error="{_escape(error)}"}} {n}')
        out += [
            "# HELP kybernate_hookd_bytes_total GPU memory moved by checkpoint (device_to_host) and restore (host_to_device).",
            "# TYPE kybernate_hookd_bytes_total counter",
        ]
        for direction, n in sorted(self._bytes.items()):
            out.append(f'kybernate_hookd_bytes_total{{direction="{direction}"}} {n}')
        out += [
            "# HELP kybernate_hookd_requests_total RPCs served, by outcome.",
            "# TYPE kybernate_hookd_requests_total counter",
        ]
        for (rpc, outcome), n in sorted(self._requests.items()):
            out.append(f'kybernate_hookd_requests_total{{rpc="{rpc}",outcome="{outcome}"}} {n}')
        out += [
            "# HELP kybernate_hookd_driver_calls_in_flight Blocking driver and NVML calls that have not returned.",
            "# TYPE kybernate_hookd_driver_calls_in_flight gauge",
            f"kybernate_hookd_driver_calls_in_flight {self._in_flight()}",
        ]
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
                status, body, ctype = "200 OK", metrics.render(), "text/plain; version=0.0.4; charset=utf-8"
            elif path == "/healthz":
                status, body, ctype = "200 OK", "ok\n", "text/plain"
            else:
                status, body, ctype = "404 Not Found", "try /metrics\n", "text/plain"
            data = body.encode()
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + (data if parts[:1] != ["HEAD"] else b""))
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeDecodeError) as err:
            log.debug("metrics request dropped", extra={"fields": {"error": repr(err)}})
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    return server
