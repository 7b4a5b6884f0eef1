#!/usr/bin/env python3
"""The standby scenario on a real GPU (issue 12): wake on connect and VRAM multiplexing, measured.

Run by tests/gpu/on_gpu.sh with `--scenario standby --runtime kybernate` (it then runs this file instead of
scenario.py, with the same arguments) and hookd started with standby on, e.g.

    KYB_HOOKD_ARGS="--standby --standby-default on --standby-idle 1h --standby-gpu-budget all=45Gi \
        --standby-busy-window-s 0 --standby-watch-period-s 0.02"

Containers run on the host network (scenario.py's default), each server on its own port; hookd watches only
each workload's own listening sockets, and the host network's packet counters never look idle, so every park
here is an API park or the arbiter's.

1. connect-to-first-byte: a `--ttfb-vram-gib` (2.6) GiB server is parked through the Standby API, then a TCP
   client connects and sends a GET; the time to the first byte of the answer (the server's answer reads all
   of its VRAM) is compared with the driver's restore + unlock time of the same wake (hookd's metrics):
   target ttfb <= restore + unlock + 100 ms. `--ttfb-rounds` (3) times.
2. hibernate (tier disk): a `--ttfb-vram-gib` (2.6) GiB server is hibernated into hookd's store
   (`Standby.Park` tier disk) and woken through the API, `--hibernate-rounds` (3) times; each round has the
   hibernate and wake durations against their floors measured in the same round: the driver's lock +
   checkpoint and restore + unlock (hookd's metrics), runc's dump and restore (CRIU; the shim times them,
   hookd logs them) and CRIU's own restore time; then a GET must answer the server's checksum.
3. multiplexing: `--servers` (3) servers of `--vram-gib` (20) GiB each under the budget (45 GiB): each is
   started and parked in turn but the last, then a client sends GETs one at a time for `--duration` (60) s,
   round-robin for the first half and at random for the second. A request to a parked server wakes it on
   connect and the arbiter parks the least recently used one. Every answer must carry the server's checksum
   (bit-identical VRAM). p50/p99 of warm and RAM-wake requests, parks and evictions go to results.json.
4. cross-GPU (`--cross-gpu`, two GPUs; issue 17 item 2): a `--vram-gib` server X on GPU 0 allowed both GPUs
   (`kybernate.io/standby-gpus: <gpu0>,<gpu1>`) is parked, a `--cross-fill-gib` (30) server F on GPU 0 fills its
   budget, and X is woken through the API (`--cross-rounds` (2) times, X parked again between): hookd's placement
   picks GPU 1, which has room without parking anyone; a driver that accepts GPU pairs restores X there, one that
   refuses them (driver 580: CUDA_ERROR_INVALID_VALUE) makes the wake fall back to GPU 0, parking F. Recorded per
   round: the placement and refusal log lines, the GPU X's process is on after the wake (nvidia-smi; the fake
   driver's record), the wake's seconds, and the checksum of a GET (must be X's).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import grpc  # noqa: E402
from scenario import Runner, StepError, gpu_of, gpu_uuids, hookd_lines, log  # noqa: E402

from kybernate.api import standby_pb2 as spb  # noqa: E402
from kybernate.api import standby_pb2_grpc  # noqa: E402

BASE_PORT = 8100


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--ctr", default="ctr")
    p.add_argument("--address", required=True)
    p.add_argument("--namespace", default="kybgpu")
    p.add_argument("--image", default="docker.io/kybernate/gpu-skeleton:latest")
    p.add_argument("--snapshotter", default="")
    p.add_argument("--base", required=True)
    p.add_argument("--state", default="")
    p.add_argument("--runtime", default="kybernate")
    p.add_argument("--vram-gib", type=float, default=20.0)
    p.add_argument("--ttfb-vram-gib", type=float, default=2.6)
    p.add_argument("--ttfb-rounds", type=int, default=3)
    p.add_argument("--hibernate-rounds", type=int, default=3)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--bind", action="append")
    p.add_argument("--own-netns", action="store_true")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--results", default="")
    p.add_argument("--hookd-socket", default="/run/kybernate/hookd.sock")
    p.add_argument("--hookd-metrics", default="http://127.0.0.1:9464/metrics")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--cross-gpu", action="store_true", help="the cross-GPU part (two GPUs)")
    p.add_argument("--cross-fill-gib", type=float, default=30.0)
    p.add_argument("--cross-rounds", type=int, default=2)
    p.add_argument("--cross-only", action="store_true", help="skip the other parts")
    a, _ = p.parse_known_args(argv)  # on_gpu.sh passes scenario.py's options too
    return a


def fake_gpu_env(cid: str, gib: float, gpu: str = "") -> list[str]:
    """--no-gpu rehearsal with the fake driver (FAKEGPU_STATE_DIR set, its libcuda/libnvml given to hookd): the
    server becomes a fake CUDA process holding `gib` on `gpu` (default the node's first fake GPU), so hookd parks
    and wakes it."""
    state = os.environ.get("FAKEGPU_STATE_DIR", "")
    if not state:
        return []
    if not gpu:
        with open(os.path.join(state, "gpus.txt")) as f:
            gpu = f.readline().split("\t")[0]
    return ["NVIDIA_VISIBLE_DEVICES=all", f"FAKEGPU_STATE_DIR={state}", f"FAKEGPU_PROC={cid}",
            f"FAKEGPU_GPU={gpu}", f"FAKEGPU_VRAM={int(gib * 2**30)}"]


def last_log_fields(path: str, msg: str) -> dict[str, str]:
    """key=value fields of hookd's last log line with that msg (logfmt), {} when there is none."""
    found: dict[str, str] = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if f'msg="{msg}"' in line or f"msg={msg} " in line:
                    found = {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', line)}
    except OSError:
        pass
    return found


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] * 1000, 1)


class Scenario:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.runner = Runner(a)
        self.channel = grpc.insecure_channel(f"unix:{a.hookd_socket}")
        self.standby = standby_pb2_grpc.StandbyStub(self.channel)
        self.ports: dict[str, int] = {}
        self.refs: dict[str, str] = {}

    def start_server(self, name: str, gib: float, port: int, gpu: tuple[int, str] | None = None,
                     annotations: dict[str, str] | None = None) -> None:
        """A server; on GPU `gpu` (index, UUID): CUDA sees that one alone, and the container every GPU's device."""
        cid = f"kyb-sb-{name}"
        self.runner.ctr.remove(cid)
        out = self.runner.out_dir(f"sb-{name}")
        command = [sys.executable, "/kyb/standby_server.py", "--vram-gib", str(gib), "--port", str(port),
                   "--out-dir", "/out", "--backend", "py" if self.a.no_gpu else "torch"]
        env = fake_gpu_env(cid, gib, gpu[1] if gpu else "") if self.a.no_gpu else []
        if gpu is not None:
            env += ["CUDA_DEVICE_ORDER=PCI_BUS_ID", f"CUDA_VISIBLE_DEVICES={gpu[0]}"]
        self.runner.start_container(cid, out, command, env=env or None, annotations=annotations)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with open(os.path.join(out, "status")) as f:
                    words = f.read().split()
                if words and words[0] == "ready":
                    self.refs[cid], self.ports[cid] = words[1], port
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise StepError(f"server {cid} did not get ready")

    def state(self, cid: str) -> str:
        return self.standby.Status(spb.StatusRequest(name=cid), timeout=30).workloads[0].state

    def wait_known(self, cid: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.standby.Status(spb.StatusRequest(name=cid), timeout=30).workloads[0].vram_bytes:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise StepError(f"hookd does not list {cid} with its VRAM")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.a.hookd_metrics, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("kybernate_hookd_"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def get(self, cid: str) -> tuple[float, float, str]:
        """(connect-to-first-byte, whole request) seconds and the body, over a raw TCP connection."""
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.ports[cid]), timeout=300) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            first = s.recv(1)
            t_first = time.monotonic()
            data = first
            while chunk := s.recv(65536):
                data += chunk
        body = data.decode(errors="replace").split("\r\n\r\n", 1)[-1].strip()
        return t_first - t0, time.monotonic() - t0, body

    def ttfb(self) -> dict:
        cid = "kyb-sb-ttfb"
        self.start_server("ttfb", self.a.ttfb_vram_gib, BASE_PORT)
        self.wait_known(cid)
        rounds = []
        warm = [self.get(cid)[0] for _ in range(5)]
        for _ in range(self.a.ttfb_rounds):
            park = self.standby.Park(spb.ParkRequest(name=cid, reason="ttfb"), timeout=600)
            before = self.metrics()
            first, whole, body = self.get(cid)
            deadline = time.monotonic() + 60
            while self.state(cid) != "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            after = self.metrics()

            def delta(step: str, a: dict = after, b: dict = before) -> float:
                key = f'kybernate_hookd_step_duration_seconds_sum{{step="{step}"}}'
                return a.get(key, 0.0) - b.get(key, 0.0)

            restore = delta("restore") + delta("unlock")
            ok = body == f"{self.refs[cid]} True"
            rounds.append({"park_s": round(park.last_park_s, 3), "ttfb_s": round(first, 3),
                           "request_s": round(whole, 3), "driver_restore_unlock_s": round(restore, 3),
                           "target_met": first <= restore + 0.1, "checksum_ok": ok})
            log(f"ttfb {first * 1000:.0f} ms vs driver restore+unlock {restore * 1000:.0f} ms (checksum ok={ok})")
        self.runner.ctr.remove(cid)
        return {"vram_gib": self.a.ttfb_vram_gib, "warm_ttfb_ms": percentile(warm, 50), "rounds": rounds}

    def hibernate(self) -> dict:
        cid = "kyb-sb-hib"
        self.start_server("hib", self.a.ttfb_vram_gib, BASE_PORT + 50)
        self.wait_known(cid)
        hookd_log = os.path.join(self.a.base, "hookd.log")
        rounds = []
        for _ in range(self.a.hibernate_rounds):
            m0 = self.metrics()
            t0 = time.monotonic()
            self.standby.Park(spb.ParkRequest(name=cid, reason="hibernate", tier="disk"), timeout=900)
            hibernate_s = time.monotonic() - t0
            m1 = self.metrics()
            t1 = time.monotonic()
            self.standby.Wake(spb.WakeRequest(name=cid), timeout=900)
            wake_s = time.monotonic() - t1
            m2 = self.metrics()
            first, whole, body = self.get(cid)

            def step(name: str, a: dict, b: dict) -> float:
                key = f'kybernate_hookd_step_duration_seconds_sum{{step="{name}"}}'
                return a.get(key, 0.0) - b.get(key, 0.0)

            slept = last_log_fields(hookd_log, "hibernated")
            woke = last_log_fields(hookd_log, "woken from the store")
            committed = last_log_fields(hookd_log, "store checkpoint committed")
            driver_ckpt = step("lock", m1, m0) + step("checkpoint", m1, m0)
            driver_restore = step("restore", m2, m1) + step("unlock", m2, m1)
            runc_dump = float(slept.get("runc_dump_s", 0))
            runc_restore = float(woke.get("runc_restore_s", 0))
            ok = body == f"{self.refs[cid]} True"
            rounds.append({
                "hibernate_s": round(hibernate_s, 3), "wake_s": round(wake_s, 3),
                "image_bytes": int(committed.get("bytes", 0)),
                "driver_lock_checkpoint_s": round(driver_ckpt, 3), "runc_dump_s": runc_dump,
                "hibernate_floor_s": round(driver_ckpt + runc_dump, 3),
                "driver_restore_unlock_s": round(driver_restore, 3), "runc_restore_s": runc_restore,
                "criu_restore_s": float(woke.get("criu_restore_s", 0)), "verify_s": float(woke.get("verify_s", 0)),
                "wake_floor_s": round(driver_restore + runc_restore, 3),
                "ttfb_after_wake_s": round(first, 3), "request_s": round(whole, 3), "checksum_ok": ok})
            log(f"hibernate {hibernate_s:.2f} s (floor {driver_ckpt + runc_dump:.2f}), wake {wake_s:.2f} s (floor "
                f"{driver_restore + runc_restore:.2f}: driver {driver_restore:.2f} + runc/CRIU {runc_restore:.2f}), "
                f"checksum ok={ok}")
        self.runner.ctr.remove(cid)
        return {"vram_gib": self.a.ttfb_vram_gib, "rounds": rounds}

    def multiplex(self) -> dict:
        names = [f"kyb-sb-m{i}" for i in range(self.a.servers)]
        for i, cid in enumerate(names):
            self.start_server(f"m{i}", self.a.vram_gib, BASE_PORT + 1 + i)
            self.wait_known(cid)
            if i < len(names) - 1:
                self.standby.Park(spb.ParkRequest(name=cid, reason="start the next"), timeout=600)
        m0 = self.metrics()
        rng = random.Random(self.a.seed)
        lat: dict[str, list[float]] = {"warm": [], "ram-wake": []}
        failures: list[str] = []
        start, n = time.monotonic(), 0
        while time.monotonic() - start < self.a.duration:
            first_half = time.monotonic() - start < self.a.duration / 2
            cid = names[n % len(names)] if first_half else rng.choice(names)
            n += 1
            kind = "ram-wake" if self.state(cid) == "parked" else "warm"
            try:
                _, whole, body = self.get(cid)
            except OSError as err:
                failures.append(f"{cid}: {err}")
                continue
            if body != f"{self.refs[cid]} True":
                failures.append(f"{cid}: answered {body!r}")
                continue
            lat[kind].append(whole)
        m1 = self.metrics()
        parks = {k: m1[k] - m0.get(k, 0.0) for k in m1 if k.startswith("kybernate_hookd_standby_parks_total")}
        evictions = m1.get("kybernate_hookd_standby_evictions_total", 0.0) - m0.get(
            "kybernate_hookd_standby_evictions_total", 0.0)
        for cid in names:
            self.runner.ctr.remove(cid)
        result = {"servers": self.a.servers, "vram_gib": self.a.vram_gib, "requests": n, "failures": failures,
                  "evictions": evictions, "parks": parks}
        for kind, values in lat.items():
            result[kind] = {"n": len(values), "p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99)}
        log(f"multiplex: {n} requests, {len(failures)} failed, warm {result['warm']}, ram-wake {result['ram-wake']},"
            f" evictions {evictions}")
        return result


    def cross_gpu(self) -> dict:
        uuids = gpu_uuids(self.a.no_gpu)
        if len(uuids) < 2:
            raise StepError(f"--cross-gpu needs two GPUs, this machine has {uuids or 'none'}")
        g0, g1 = uuids[0], uuids[1]
        x, fill = "kyb-sb-x", "kyb-sb-fill"
        hookd_log = os.path.join(self.a.base, "hookd.log")
        self.start_server("x", self.a.vram_gib, BASE_PORT + 60, (0, g0), {"kybernate.io/standby-gpus": f"{g0},{g1}"})
        self.wait_known(x)
        rounds = []
        for i in range(self.a.cross_rounds):
            self.standby.Park(spb.ParkRequest(name=x, reason="cross-gpu"), timeout=600)
            if i == 0:
                self.start_server("fill", self.a.cross_fill_gib, BASE_PORT + 61, (0, g0))
                self.wait_known(fill)
            elif self.state(fill) == "parked":  # the fallback of the last round parked it: GPU 0 full again
                self.standby.Wake(spb.WakeRequest(name=fill), timeout=600)
            placements = len(hookd_lines(self.a.base, 'msg="standby placement'))
            t0 = time.monotonic()
            self.standby.Wake(spb.WakeRequest(name=x), timeout=900)
            wake_s = time.monotonic() - t0
            _, whole, body = self.get(x)
            pid = self.runner.ctr.task_pid(x)
            after = gpu_of(pid, x, self.a.no_gpu)
            placed = hookd_lines(self.a.base, 'msg="standby placement')[placements:]
            rounds.append({
                "wake_s": round(wake_s, 3), "gpu_after": after, "moved": after == [g1],
                "placement": placed[-1:] or None, "fill_state": self.state(fill),
                "refused": hookd_lines(self.a.base, "refuses to restore onto another GPU")[-1:],
                "restored": last_log_fields(hookd_log, "restored"), "request_s": round(whole, 3),
                "checksum_ok": body == f"{self.refs[x]} True"})
            log(f"cross-gpu round {i}: woke on {after} in {wake_s:.2f} s, fill {rounds[-1]['fill_state']}, "
                f"placement {placed[-1:] or 'none (remap refused before)'}")
        for cid in (x, fill):
            self.runner.ctr.remove(cid)
        return {"gpus": [g0, g1], "vram_gib": self.a.vram_gib, "fill_gib": self.a.cross_fill_gib, "rounds": rounds}


def main(argv: list[str]) -> int:
    a = parse(argv)
    results: dict = {"scenario": "standby", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "argv": argv}
    s = Scenario(a)
    try:
        if not a.cross_only:
            results["ttfb"] = s.ttfb()
            if a.hibernate_rounds:
                results["hibernate"] = s.hibernate()
            results["multiplex"] = s.multiplex()
        if a.cross_gpu:
            results["cross_gpu"] = s.cross_gpu()
    except (StepError, grpc.RpcError, OSError) as err:
        results["error"] = str(err)
        log(f"standby scenario failed: {err}")
    results["ctr_commands"] = s.runner.ctr.commands
    if a.results:
        with open(a.results, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps({k: v for k, v in results.items() if k != "ctr_commands"}, indent=1))
    bad = ("error" in results or results.get("multiplex", {}).get("failures")
           or not all(r["checksum_ok"] for r in results.get("hibernate", {}).get("rounds", []))
           or not all(r["checksum_ok"] for r in results.get("cross_gpu", {}).get("rounds", [])))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
