"""`make standby-demo`: three HTTP "model servers" share one fake GPU that holds only two of them.

On a private containerd (2.1.9 by default) from the test stack, with CNI, and a real kybernate-hookd with
--standby on the named fake driver (tests/fakes/fakegpu) whose one GPU has 10 GiB. Each server is a CRI pod
(runtime handler kybernate) holding 4 GiB of fake VRAM and answering GET /model with its checksum, opted in
to standby with wake on connect, and saying its VRAM (`kybernate.io/vram-request`): the third server's
start gets its room from the arbiter, which parks the least recently used. A client sends requests one at a time, round-robin for the first half of
the run and at random for the second; a request to a parked server wakes it on connect, and the arbiter
parks the least recently used of the other two to make room. Every request must succeed with the right
checksum (exit 1 otherwise). Prints p50/p99 latency of warm and RAM-wake requests and the parks.

Then `--disk-duration` seconds (20; 0: skip) with the disk tier: hookd restarts with a host-RAM budget of one
byte, so every RAM-parked server is demoted to disk (hibernated into hookd's store) right after its park. A
hibernated server has no listening socket (it went with its processes), so the client wakes it through the
API (Standby.Wake, what `kybernate wake` does) and then sends its request: a disk-wake request's latency is
that wake plus the request. Prints their p50/p99 too.

    python tests/bench/standby_demo.py [--duration 60] [--disk-duration 20] [--version 2.1]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from harness import images  # noqa: E402
from harness.containerd import Containerd  # noqa: E402
from harness.gpunode import G0, H100, GiB, GpuNode, fakegpu  # noqa: E402
from harness.stack import load_stack  # noqa: E402
from harness.workload import wait_for  # noqa: E402

import grpc  # noqa: E402
from kybernate.api import standby_pb2 as spb  # noqa: E402
from kybernate.api import standby_pb2_grpc  # noqa: E402

from kybernate.hooks.containerd.client import ContainerdClient  # noqa: E402

VENV_BIN = Path(sys.executable).parent
SERVERS = ("llama", "mistral", "qwen")
VRAM = 4 * GiB  # each; three of them (12 GiB) do not fit the 10 GiB GPU


def config_snippet(version: str, runtime_toml: Path) -> str:
    name = "config-v2-kybernate.toml" if version == "1.6" else "config-v3-kybernate.toml"
    text = (ROOT / "containerd-config" / name).read_text()
    text = text.replace("/usr/local/bin/containerd-shim-kybernate-v1", str(VENV_BIN / "containerd-shim-kybernate-v1"))
    return text.replace("/etc/kybernate/runtime.toml", str(runtime_toml))


def checksum(name: str) -> str:
    return hashlib.sha256(f"weights of {name}".encode()).hexdigest()[:16]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def requests(api: ContainerdClient, standby: Any, cids: dict[str, str], ips: dict[str, str], duration: float,
             rng: random.Random, latencies: dict[str, list[float]], n: int, failures: int) -> tuple[int, int]:
    """One request at a time for `duration` s, round-robin for the first half, then at random; each latency
    filed under warm, ram-wake (its server was paused: wake on connect) or disk-wake (hibernated: the API wake,
    then the request)."""
    start = time.monotonic()
    while time.monotonic() - start < duration:
        name = SERVERS[n % len(SERVERS)] if time.monotonic() - start < duration / 2 else rng.choice(SERVERS)
        n += 1
        status = standby.Status(spb.StatusRequest(name=cids[name]), timeout=10).workloads[0]
        while status.state == "demoting":  # a disk-tier client asks after the demotion (docs/standby.md)
            time.sleep(0.02)
            status = standby.Status(spb.StatusRequest(name=cids[name]), timeout=10).workloads[0]
        if status.state == "parked" and status.tier == "disk":
            kind = "disk-wake"
        else:
            kind = "ram-wake" if api.task_status(cids[name]) == "PAUSED" else "warm"
        t0 = time.monotonic()
        try:
            if kind == "disk-wake":
                standby.Wake(spb.WakeRequest(name=cids[name]), timeout=120)
            with urllib.request.urlopen(f"http://{ips[name]}:8080/model", timeout=60) as r:
                body = r.read().decode().strip()
        except (OSError, grpc.RpcError) as err:
            failures += 1
            print(f"   FAILED request {n} to {name} ({kind}): {err}", flush=True)
            continue
        seconds = time.monotonic() - t0
        if body != checksum(name):
            failures += 1
            print(f"   FAILED request {n} to {name}: checksum {body!r}", flush=True)
            continue
        latencies[kind].append(seconds)
    return n, failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of requests [%(default)s]")
    ap.add_argument("--version", default="2.1", choices=("1.6", "2.1"), help="containerd [%(default)s]")
    ap.add_argument("--disk-duration", type=float, default=20.0, help="seconds with the disk tier [%(default)s]")
    ap.add_argument("--seed", type=int, default=12)
    args = ap.parse_args()
    stack = load_stack()
    tmp = Path(tempfile.mkdtemp(prefix="kyb-standby-demo-"))
    gpu = GpuNode(tmp)
    gpu.node.set_gpus([fakegpu.FakeGpu(G0, H100, 10 * GiB)])
    toml = tmp / "runtime.toml"
    toml.write_text(gpu.runtime_toml())
    c = Containerd(stack, args.version, extra_path=[VENV_BIN], extra_config=config_snippet(args.version, toml),
                   env={"KYBERNATE_CONFIG": str(toml)})
    failures = 0
    try:
        print(f"== containerd {stack.containerd[args.version].version}, a fake GPU of 10 GiB, three servers of 4 GiB",
              flush=True)
        c.start()
        images.import_image(c, images.busybox_image(tmp, stack.busybox), namespace="k8s.io")
        images.import_image(c, images.pause_image(tmp, stack.busybox), namespace="k8s.io")
        # The client is sequential, so no other server is in the middle of a request: no busy window.
        gpu.stop_hookd_gracefully()
        gpu.hookd_args = ["--store-root", str(tmp / "store"), "--store-registry", str(tmp / "registry.db")]
        gpu.extra_args = ["--standby", "--containerd-address", str(c.address), "--standby-sample-period-s", "0.2",
                          "--standby-state-dir", str(tmp / "standby"), "--standby-busy-window-s", "0",
                          "--standby-watch-period-s", "0.02", "--standby-retry-s", "0.2"]
        gpu.start()
        standby = standby_pb2_grpc.StandbyStub(grpc.insecure_channel(f"unix:{gpu.socket}"))
        ips: dict[str, str] = {}
        cids: dict[str, str] = {}
        with c.cri() as cri:
            for name in SERVERS:
                # vram-request: before each server starts, the arbiter makes room for it on the GPU.
                config = cri.pod_config(name, annotations={"kybernate.io/standby": "true",
                                                           "kybernate.io/standby-idle": "5s",
                                                           "kybernate.io/vram-request": f"{VRAM >> 20}Mi"})
                pod = cri.run_pod(config, runtime_handler="kybernate")
                ips[name] = cri.pod_status(pod).network.ip
                env = {"NVIDIA_VISIBLE_DEVICES": "all", **gpu.node.env,
                       **gpu.node.process_env(f"model-{name}", G0, VRAM)}
                serve = f"mkdir -p /www && echo {checksum(name)} > /www/model && exec httpd -f -p 8080 -h /www"
                # A pid namespace of its own, as the kubelet gives each container: only such can hibernate.
                cids[name] = cri.create_container(pod, config, name, images.BUSYBOX_IMAGE,
                                                  command=["sh", "-c", serve], env=env, own_pid_namespace=True)
                cri.start_container(cids[name])
                print(f"   {name}: pod {ips[name]}, {VRAM >> 30} GiB of VRAM, checksum {checksum(name)}", flush=True)
                wait_for(f"hookd to list {name}", lambda n=name: any(
                    w.container_id == cids[n] and w.vram_bytes == VRAM
                    for w in standby.Status(spb.StatusRequest(), timeout=10).workloads), 30)
                for w in standby.Status(spb.StatusRequest(), timeout=10).workloads:
                    if w.state == "parked" and f"for {w.namespace}/{cids[name]} (start)" in w.reason:
                        parked = next(n for n, cid in cids.items() if cid == w.container_id)
                        print(f"   {parked}: parked by the arbiter before {name} started", flush=True)
        rng = random.Random(args.seed)
        latencies: dict[str, list[float]] = {"warm": [], "ram-wake": [], "disk-wake": []}
        print(f"== {args.duration:.0f} s of requests: round-robin, then random", flush=True)
        n = 0
        with ContainerdClient(c.address, "k8s.io") as api:
            n, failures = requests(api, standby, cids, ips, args.duration, rng, latencies, n, failures)
            if args.disk_duration > 0:
                print(f"== {args.disk_duration:.0f} s with the disk tier: hookd demotes every RAM-parked server to "
                      "disk; the client wakes a hibernated one through the API, then asks it", flush=True)
                gpu.stop_hookd_gracefully()
                gpu.extra_args += ["--standby-ram-budget", "1"]
                gpu.start()
                wait_for("the restarted hookd to list the servers", lambda: len(
                    standby.Status(spb.StatusRequest(), timeout=10).workloads) == len(SERVERS), 30)
                n, failures = requests(api, standby, cids, ips, args.disk_duration, rng, latencies, n, failures)
        log = gpu.log.read_text()
        parks = re.findall(r'msg="standby parked" .*?trigger=(\w+)', log)
        print(f"== {n} requests, {failures} failed", flush=True)
        for kind, values in latencies.items():
            if values:
                print(f"   {kind:9s} n={len(values):4d}  p50={percentile(values, 50) * 1000:7.1f} ms  "
                      f"p99={percentile(values, 99) * 1000:7.1f} ms  mean={statistics.mean(values) * 1000:7.1f} ms")
        print(f"   parks: {len(parks)} ({', '.join(f'{t}: {parks.count(t)}' for t in sorted(set(parks)))})")
        demoted = len(re.findall(r'msg="standby demoted"', log))
        print(f"   demoted to disk: {demoted}")
        if args.disk_duration > 0 and not latencies["disk-wake"]:
            print("FAILED: no request found its server on disk", file=sys.stderr)
            return 1
        if not latencies["ram-wake"]:
            print("FAILED: no request found its server parked", file=sys.stderr)
            return 1
    finally:
        c.stop()
        gpu.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
