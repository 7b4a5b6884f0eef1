"""Shared helpers of the hookd tests (a unique module name: test folders here are not packages)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fakes"))

import fakegpu  # noqa: E402

T = TypeVar("T")

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-40GB"
GiB = 1 << 30
G0 = "GPU-3ffe047a-0b03-a6b5-a359-0ecfad913d83"
G1 = "GPU-5a1b2c3d-1111-2222-3333-444455556666"
G2 = "GPU-9e8d7c6b-aaaa-bbbb-cccc-ddddeeeeffff"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def wait_exec(pid: int) -> None:
    # Until exec, /proc/<pid>/environ is still the parent's: wait for the child's own environment.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if b"FAKEGPU_PROC=" in Path(f"/proc/{pid}/environ").read_bytes():
                return
        except OSError:
            pass
        time.sleep(0.002)
    raise AssertionError(f"pid {pid} never exec'd")


class Freezer:
    """Freeze real processes with a cgroup of our own: v1 freezer (this machine) or v2 cgroup.freeze."""

    def __init__(self, path: Path, v1: bool) -> None:
        self.path = path
        self.v1 = v1
        path.mkdir()

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def freeze(self) -> None:
        if self.v1:
            (self.path / "freezer.state").write_text("FROZEN")
            deadline = time.monotonic() + 5
            while (self.path / "freezer.state").read_text().strip() != "FROZEN" and time.monotonic() < deadline:
                time.sleep(0.005)
        else:
            (self.path / "cgroup.freeze").write_text("1")

    def thaw(self) -> None:
        if self.v1:
            (self.path / "freezer.state").write_text("THAWED")
        else:
            (self.path / "cgroup.freeze").write_text("0")

    def remove(self) -> None:
        self.thaw()
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (self.path.parent / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # already gone
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.01)


def events_for(node: fakegpu.FakeNode, op: str | None = None, pid: int | None = None) -> list[fakegpu.Event]:
    return [e for e in node.events() if (op is None or e.op == op) and (pid is None or e.pid == pid)]


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a /metrics body (HTTP headers, if any, skipped); KeyError names what is missing."""
    from prometheus_client.parser import text_string_to_metric_families

    body = text.split("\r\n\r\n", 1)[1] if text.startswith("HTTP/") else text
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise KeyError(f"no sample {name}{labels} in:\n{body}")


async def until(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    """Wait for a condition on observable state (hookd's in-flight calls, its pending list); fail after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s} s")
        await asyncio.sleep(0.005)
