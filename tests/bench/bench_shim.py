"""Kybernate's cost over the stock runc shim, on the same private containerd.

Paired and interleaved so drift hits both sides alike:
- `ctr run --rm` wall time of a container that runs `true`, runtime kybernate vs io.containerd.runc.v2;
- one State and one Pids round trip over ttrpc, to our shim vs straight to the runc shim behind it
  (the same container, so the difference is exactly the proxy hop).

Usage: python tests/bench/bench_shim.py [--containerd 1.6|2.1] [--runs 20] [--calls 200] [--resident]
Prints a markdown table. With --resident a kybernate-shimd is started for the instance first.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from harness import images  # noqa: E402
from harness.containerd import Containerd  # noqa: E402
from harness.stack import load_stack  # noqa: E402

from kybernate.api import task_pb2  # noqa: E402
from kybernate.shim import client, manager  # noqa: E402
from kybernate.shim.ttrpc.client import Client  # noqa: E402
from kybernate.shim.upstream import TASK_V2  # noqa: E402

KYBERNATE = "io.containerd.kybernate.v1"
RUNC = "io.containerd.runc.v2"


def start_resident(sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "kybernate.shim.resident", "--socket", str(sock)],
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                return proc
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("kybernate-shimd did not come up") from None
        time.sleep(0.05)


def timed_run(c: Containerd, runtime: str, name: str) -> float:
    started = time.perf_counter()
    c.ctr("run", "--rm", "--runtime", runtime, images.BUSYBOX_IMAGE, name, "true")
    return time.perf_counter() - started


def timed_start(c: Containerd, runtime: str, name: str) -> float:
    """`ctr run -d`: returns once the task is started; teardown is not timed."""
    started = time.perf_counter()
    c.ctr("run", "-d", "--runtime", runtime, images.BUSYBOX_IMAGE, name, "sleep", "60")
    took = time.perf_counter() - started
    c.ctr("tasks", "kill", "-s", "SIGKILL", name)
    c.ctr("tasks", "delete", name, check=False)
    while c.ctr("tasks", "delete", name, check=False).returncode == 0 or name in c.ctr("tasks", "ls").stdout:
        time.sleep(0.02)
    c.ctr("containers", "delete", name)
    return took


async def round_trips(address: str, service: str, namespace: str, container: str, calls: int) -> dict[str, list[float]]:
    client = await Client.connect(address)
    meta = (("containerd-namespace-ttrpc", namespace),)
    out: dict[str, list[float]] = {"State": [], "Pids": []}
    try:
        for _ in range(calls):
            for method, request in (("State", task_pb2.StateRequest(id=container)), ("Pids", task_pb2.PidsRequest(id=container))):
                started = time.perf_counter()
                await client.call(service, method, request.SerializeToString(), metadata=meta)
                out[method].append(time.perf_counter() - started)
    finally:
        await client.close()
    return out


def row(name: str, ours: list[float], base: list[float], unit: float, label: str) -> str:
    mo, mb = statistics.median(ours) * unit, statistics.median(base) * unit
    return f"| {name} | {mb:.2f} {label} | {mo:.2f} {label} | {mo - mb:+.2f} {label} | {len(ours)} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containerd", default="2.1", choices=["1.6", "2.1"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--resident", action="store_true", help="start kybernate-shimd for the instance first")
    args = parser.parse_args()

    stack = load_stack()
    work = Path(tempfile.mkdtemp(prefix="bench-shim-"))
    env = {client.SOCKET_ENV: str(work / "shimd.sock") if args.resident else "off"}
    resident = start_resident(work / "shimd.sock") if args.resident else None
    c = Containerd(stack, args.containerd, extra_path=[Path(sys.executable).parent], log_level="info", env=env)
    try:
        c.start()
        with tempfile.TemporaryDirectory() as d:
            images.import_image(c, images.busybox_image(Path(d), stack.busybox))
        timed_run(c, RUNC, "warm-runc")
        timed_run(c, KYBERNATE, "warm-kyb")
        runc_s, kyb_s, runc_d, kyb_d = [], [], [], []
        for i in range(args.runs):
            order = [(RUNC, runc_s, runc_d), (KYBERNATE, kyb_s, kyb_d)]
            for runtime, whole, start in order if i % 2 == 0 else reversed(order):
                tag = "k" if runtime == KYBERNATE else "r"
                whole.append(timed_run(c, runtime, f"b{i}-{tag}"))
                start.append(timed_start(c, runtime, f"d{i}-{tag}"))

        c.ctr("run", "-d", "--runtime", KYBERNATE, images.BUSYBOX_IMAGE, "rt", "sleep", "3600")
        ours = manager.socket_address(str(c.address), c.namespace, "rt")
        state = manager.GroupState.load(ours)
        assert state is not None, "no group state for the benchmark container"
        child_service = "containerd.task.v3.Task" if state.child_task_api >= 3 else TASK_V2
        ours_t: dict[str, list[float]] = {"State": [], "Pids": []}
        base_t: dict[str, list[float]] = {"State": [], "Pids": []}
        for i in range(4):  # interleave blocks of calls
            per = args.calls // 4
            a = asyncio.run(round_trips(ours, TASK_V2, c.namespace, "rt", per))
            b = asyncio.run(round_trips(state.child_address, child_service, c.namespace, "rt", per))
            for k in ours_t:
                ours_t[k] += a[k]
                base_t[k] += b[k]
        c.ctr("tasks", "kill", "-s", "SIGKILL", "rt")
    finally:
        c.stop()
        if resident is not None:
            resident.terminate()
            resident.wait(10)

    version = subprocess.run([str(stack.containerd[args.containerd].containerd), "--version"],
                             capture_output=True, text=True).stdout.split()[2]
    mode = "resident kybernate-shimd" if args.resident else "no resident process"
    print(f"containerd {version}, {args.runs} paired runs, {args.calls} paired calls, {mode}, medians\n")
    print("| measure | runc-v2 | kybernate | difference | n |")
    print("| --- | --- | --- | --- | --- |")
    print(row("`ctr run --rm` wall time (start, run `true`, delete)", kyb_s, runc_s, 1000, "ms"))
    print(row("`ctr run -d` wall time (until the task is started)", kyb_d, runc_d, 1000, "ms"))
    print(row("State round trip", ours_t["State"], base_t["State"], 1000, "ms"))
    print(row("Pids round trip", ours_t["Pids"], base_t["Pids"], 1000, "ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
