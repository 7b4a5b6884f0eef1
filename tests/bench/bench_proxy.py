"""The proxied call's cost, taken apart: State round trips straight to the runc shim, through the pod
daemon containerd started, and through a second copy of the pod daemon's serving path run by this script
(so that it can be profiled without touching the real one).

All three talk to the same runc shim child of one kybernate container on a private containerd; blocks
of calls are interleaved so that drift hits each path alike.

Usage: python tests/bench/bench_proxy.py [--containerd 1.6|2.1] [--calls 2000] [--profile FILE]
With --profile the script's own proxy runs under cProfile and writes its stats to FILE (the timings of
that path then include the profiler's cost; the other two do not).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from kybernate.api import task_pb2  # noqa: E402
from kybernate.shim.ttrpc.client import Client  # noqa: E402
from kybernate.shim.upstream import TASK_V2  # noqa: E402

NAMESPACE_KEY = "containerd-namespace-ttrpc"


async def serve_proxy(sock: str, child: str, task_api: int, namespace: str) -> None:
    """What shim/daemon.py serve() does on the call path: Upstream, TaskService, Server."""
    from kybernate.shim.daemon import hookd_driver
    from kybernate.shim.runtime_options import RuntimeConfig
    from kybernate.shim.service import TaskService
    from kybernate.shim.ttrpc.server import Server
    from kybernate.shim.upstream import Upstream

    upstream = await Upstream.connect(child, task_api)
    service = TaskService(upstream, namespace, RuntimeConfig(), hookd_driver)
    server = Server(service.handle, pass_through=service.pass_through)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    serving = asyncio.create_task(server.serve_path(sock))
    await stop.wait()
    server.close()
    await server.wait_closed()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    await upstream.close()


def proxy_main(args: argparse.Namespace) -> int:
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    asyncio.run(serve_proxy(args.serve, args.child, args.task_api, args.namespace))
    if args.profile:
        profiler.disable()
        profiler.dump_stats(args.profile)
    return 0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def listener_pid(address: str) -> int:
    """The process holding the listening socket at `address` (SO_PEERCRED names the one that bound it,
    which for a shim is its `start` command, long gone)."""
    from kybernate.shim.ttrpc.address import socket_path

    path = socket_path(address)
    inodes = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
              if line.split()[-1] == path}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    raise SystemExit(f"no process listens at {path}")


async def round_trips(address: str, service: str, namespace: str, container: str, calls: int) -> list[float]:
    client = await Client.connect(address)
    meta = ((NAMESPACE_KEY, namespace),)
    payload = task_pb2.StateRequest(id=container).SerializeToString()
    out: list[float] = []
    try:
        for _ in range(calls):
            started = time.perf_counter_ns()
            await client.call(service, "State", payload, metadata=meta)
            out.append((time.perf_counter_ns() - started) / 1e6)
    finally:
        await client.close()
    return out


def wait_for_socket(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the bench proxy did not come up")
        time.sleep(0.02)


def bench_main(args: argparse.Namespace) -> int:
    from harness import images
    from harness.containerd import Containerd
    from harness.stack import load_stack

    from kybernate.shim import client, manager

    stack = load_stack()
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    c = Containerd(stack, args.containerd, extra_path=[Path(sys.executable).parent], log_level="info",
                   env={client.SOCKET_ENV: "off"})
    proxy: subprocess.Popen[bytes] | None = None
    times: dict[str, list[float]] = {"runc-v2": [], "pod daemon": [], "bench proxy": []}
    try:
        c.start()
        with tempfile.TemporaryDirectory() as d:
            images.import_image(c, images.busybox_image(Path(d), stack.busybox))
        c.ctr("run", "-d", "--runtime", "io.containerd.kybernate.v1", images.BUSYBOX_IMAGE, "rt", "sleep", "3600")
        ours = manager.socket_address(str(c.address), c.namespace, "rt")
        state = manager.GroupState.load(ours)
        assert state is not None, "no group state for the benchmark container"
        child_service = "containerd.task.v3.Task" if state.child_task_api >= 3 else TASK_V2
        sock = str(work / "proxy.sock")
        command = [sys.executable, __file__, "--serve", sock, "--child", state.child_address,
                   "--task-api", str(state.child_task_api), "--namespace", c.namespace]
        if args.profile:
            command += ["--profile", str(Path(args.profile).resolve())]
        proxy = subprocess.Popen(command)
        wait_for_socket(sock, proxy)
        paths = {"runc-v2": (state.child_address, child_service), "pod daemon": (ours, TASK_V2),
                 "bench proxy": (sock, TASK_V2)}
        pids = {name: listener_pid(address) for name, (address, _) in paths.items()}
        user = dict.fromkeys(paths, 0.0)
        system = dict.fromkeys(paths, 0.0)
        blocks = 10
        for i in range(blocks):
            order = list(paths.items()) if i % 2 == 0 else list(reversed(paths.items()))
            for name, (address, service) in order:
                before = cpu_seconds(pids[name])
                times[name] += asyncio.run(round_trips(address, service, c.namespace, "rt", args.calls // blocks))
                after = cpu_seconds(pids[name])
                user[name] += after[0] - before[0]
                system[name] += after[1] - before[1]
        c.ctr("tasks", "kill", "-s", "SIGKILL", "rt")
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(30)
        c.stop()
    base = statistics.median(times["runc-v2"])
    print(f"containerd {args.containerd}, {args.calls} State calls per path in {blocks} interleaved blocks, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| path | median | p10 | p90 | over runc-v2 | server CPU per call (user + system) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in times.items():
        deciles = statistics.quantiles(values, n=10)
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} ms | {deciles[0]:.3f} ms | {deciles[-1]:.3f} ms | {median - base:+.3f} ms "
              f"| {user[name] / len(values) * 1e3:.3f} + {system[name] / len(values) * 1e3:.3f} ms |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containerd", default="2.1", choices=["1.6", "2.1"])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", default="", help="run the bench proxy under cProfile, stats to this file")
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)  # the proxy subprocess
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--task-api", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--namespace", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return proxy_main(args) if args.serve else bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
