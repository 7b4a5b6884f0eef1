"""Standby (scale-to-zero and multiplexing) on the real stack: containerd 1.6.20 and 2.1.9, runc, CNI, and a
real kybernate-hookd with --standby on the named fake driver (tests/fakes/fakegpu), whose NVML reports each
GPU's size, its free VRAM and per-process utilisation.

Parks and wakes are containerd's Pause and Resume: every test checks containerd's view (PAUSED / RUNNING)
against the driver's (CHECKPOINTED / RUNNING), and waits on those states and hookd's log lines, not on time.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RUNTIME, VENV_BIN
from harness.containerd import Containerd, CtrError
from harness.containerd_api import ContainerdApi, criu_checkpoint
from harness.gpunode import G0, G1, H100, GiB, GpuNode, fakegpu
from harness.images import BUSYBOX_IMAGE
from harness.workload import task_status, wait_for

from kybernate.hooks.containerd.client import ContainerdClient

pytestmark = pytest.mark.stack

# The fake CUDA process is the workload's own process: a sleep, or busybox httpd (its per-request children
# inherit FAKEGPU_PROC and are, as with the real driver, no CUDA processes).
SLEEPER = "exec sleep 100000"
WEB = "mkdir -p /www && echo alive > /www/x && exec httpd -f -p 8080 -h /www"


@pytest.fixture
def gpu(tmp_path: Path) -> Iterator[GpuNode]:
    node = GpuNode(tmp_path)
    try:
        yield node
    finally:
        node.stop()


def standby(gpu: GpuNode, c: Containerd, tmp: Path, *more: str) -> None:
    """Restart the node's hookd with standby on, against containerd `c`."""
    gpu.stop_hookd_gracefully()
    gpu.extra_args = ["--standby", "--containerd-address", str(c.address), "--standby-sample-period-s", "0.2",
                      "--standby-state-dir", str(tmp / "standby"), "--standby-retry-s", "0.5", *more]
    gpu.start()


def kybernate(gpu: GpuNode, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(VENV_BIN / "kybernate"), *args, "--socket", gpu.socket], capture_output=True,
                       text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def status(gpu: GpuNode, name: str) -> dict[str, object]:
    out = kybernate(gpu, "status", name, "--json").stdout
    return dict(json.loads(out.splitlines()[0]))


def status_once_known(gpu: GpuNode, name: str) -> dict[str, object]:
    """`status`, or {} while hookd does not know the workload yet (it learns of a task from its intent file, a
    moment after the task starts or after hookd restarts): for wait_for's probes."""
    r = kybernate(gpu, "status", name, "--json", check=False)
    if r.returncode != 0 and "no GPU workload named" in r.stderr:
        return {}
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout.splitlines()[0]))


def log_lines(gpu: GpuNode, msg: str) -> list[str]:
    return [line for line in gpu.log.read_text().splitlines() if f'msg="{msg}"' in line or f"msg={msg} " in line]


def run_gpu(c: Containerd, gpu: GpuNode, name: str, proc_id: str, *annotations: str, vram: int = 2 * GiB,
            command: str = SLEEPER, on: str = G0) -> None:
    notes = [arg for a in annotations for arg in ("--annotation", f"kybernate.io/{a}")]
    c.ctr("run", "-d", "--runtime", RUNTIME, *notes, *gpu.container_env(proc_id, on, vram=vram), BUSYBOX_IMAGE,
          name, "sh", "-c", command)


def parked(c: Containerd, gpu: GpuNode, name: str, proc_id: str) -> bool:
    return task_status(c, name) == "PAUSED" and gpu.gpu_state(proc_id) == "CHECKPOINTED"


def running(c: Containerd, gpu: GpuNode, name: str, proc_id: str) -> bool:
    return task_status(c, name) == "RUNNING" and gpu.gpu_state(proc_id) == "RUNNING"


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_an_idle_opted_in_workload_is_parked_and_an_api_wake_brings_it_back(kyb_factory, gpu: GpuNode,
                                                                            tmp_path: Path, version: str) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    standby(gpu, c, tmp_path, "--metrics-address", "127.0.0.1:0")
    port = re.findall(r"metrics=127\.0\.0\.1:(\d+)", gpu.log.read_text())[-1]
    # 4 s: long enough that the check right after the wake cannot race the next park on a loaded machine.
    run_gpu(c, gpu, "idle", "p-idle", "standby=true", "standby-idle=4s", "standby-wake=api")
    run_gpu(c, gpu, "optout", "p-optout", "standby-idle=2s")  # the node default: parking off

    wait_for("the idle workload to be parked", lambda: parked(c, gpu, "idle", "p-idle"), 60)
    s = status(gpu, "idle")
    assert s["state"] == "parked" and s["parked_by"] == "idle" and s["tier"] == "ram"
    assert "idle for" in str(s["reason"]) and "cpu" in str(s["reason"]) and "net" in str(s["reason"])
    assert float(str(s["last_park_s"])) > 0 and int(str(s["vram_bytes"])) == 2 * GiB
    # The one that did not opt in was as idle for as long and still runs on the GPU, never touched.
    optout = status(gpu, "optout")
    assert optout["state"] == "running" and not optout.get("opted_in") and float(str(optout["idle_for_s"])) >= 2
    assert running(c, gpu, "optout", "p-optout") and gpu.events("p-optout") == []

    out = kybernate(gpu, "wake", "idle").stdout
    assert "running" in out
    assert running(c, gpu, "idle", "p-idle")
    assert log_lines(gpu, "standby parked") and "trigger=api" in log_lines(gpu, "standby woke")[-1]
    # Parked again once idle again; `kybernate park` of a parked one says so and changes nothing.
    wait_for("the second park", lambda: parked(c, gpu, "idle", "p-idle"), 60)
    r = kybernate(gpu, "park", "idle", check=False)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "already parked" in r.stderr
    r = kybernate(gpu, "wake", "nosuch", check=False)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as m:
        metrics = m.read().decode()
    assert "kybernate_hookd_standby_parked 1.0" in metrics
    assert 'kybernate_hookd_standby_parks_total{outcome="ok",trigger="idle"} 2.0' in metrics
    assert 'kybernate_hookd_standby_wake_seconds_count{trigger="api"} 1.0' in metrics
    assert "kybernate_hookd_standby_evictions_total 0.0" in metrics


def http_get(ip: str, timeout: float = 30.0) -> tuple[str, float]:
    start = time.monotonic()
    with urllib.request.urlopen(f"http://{ip}:8080/x", timeout=timeout) as r:
        body = r.read().decode()
    return body, time.monotonic() - start


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_a_connection_to_a_parked_pod_wakes_it_and_gets_its_answer_also_after_a_hookd_restart(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    standby(gpu, c, tmp_path)
    with c.cri() as cri:
        config = cri.pod_config("web", annotations={"kybernate.io/standby": "true",
                                                    "kybernate.io/standby-idle": "2s"})
        pod = cri.run_pod(config, runtime_handler="kybernate")
        ip = cri.pod_status(pod).network.ip
        env = {"NVIDIA_VISIBLE_DEVICES": "all", **gpu.node.env, **gpu.node.process_env("p-web", G0, 3 * GiB)}
        cid = cri.create_container(pod, config, "web", BUSYBOX_IMAGE, command=["sh", "-c", WEB], env=env)
        cri.start_container(cid)
        assert wait_for("the web server", lambda: http_get(ip)[0]) == "alive\n"

        with ContainerdClient(c.address, "k8s.io") as api:
            def is_parked() -> bool:
                return api.task_status(cid) == "PAUSED" and gpu.gpu_state("p-web") == "CHECKPOINTED"

            wait_for("the pod to be parked", is_parked, 60)
            s = status(gpu, cid)
            assert s["state"] == "parked" and s["wake"] == "connect"
            assert {"port": 8080} in [{"port": x["port"]} for x in s.get("listeners", [])]  # type: ignore[union-attr]

            body, seconds = http_get(ip)  # a real TCP client: a delay, never an error
            assert body == "alive\n"
            # The shim's Resume thaws first, then brings the GPU state back: busybox's answer touches no GPU,
            # so it can come before the restore finished (a CUDA call of a real server waits for it).
            wait_for("the wake to finish", lambda: api.task_status(cid) == "RUNNING"
                     and gpu.gpu_state("p-web") == "RUNNING" and log_lines(gpu, "standby woke"))
            woke = log_lines(gpu, "standby woke")[-1]
            assert "trigger=connect" in woke
            print(f"containerd {version}: connect-to-answer of a RAM-parked pod {seconds * 1000:.0f} ms ({woke})")

            # hookd killed and started again while the pod is parked: it is still managed (woken on connect).
            wait_for("the pod to be parked again", is_parked, 60)
            gpu.kill9()
            gpu.start()
            wait_for("the restarted hookd to know the pod",
                     lambda: log_lines(gpu, "standby: managing a workload parked before hookd (re)started"), 30)
            assert status(gpu, cid)["state"] == "parked"
            assert http_get(ip)[0] == "alive\n"
            wait_for("the second wake to finish", lambda: api.task_status(cid) == "RUNNING"
                     and gpu.gpu_state("p-web") == "RUNNING" and len(log_lines(gpu, "standby woke")) == 2)
        cri.stop_pod(pod)
        cri.remove_pod(pod)


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_the_arbiter_parks_by_priority_and_lru_to_fit_a_wake_and_honours_a_budget_after_a_restart(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:
    gpu.node.set_gpus([fakegpu.FakeGpu(G0, H100, 12 * GiB)])  # a small GPU: three 4 GiB workloads fill it
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    standby(gpu, c, tmp_path)
    opted = ("standby=true", "standby-idle=1h", "standby-wake=api")
    run_gpu(c, gpu, "a", "p-a", *opted, vram=4 * GiB)
    wait_for("hookd to see a", lambda: status_once_known(gpu, "a").get("vram_bytes") == str(4 * GiB))
    kybernate(gpu, "park", "a", "--reason", "test")
    assert parked(c, gpu, "a", "p-a")
    # d first (the least recently active), but of a higher priority; then b and c.
    run_gpu(c, gpu, "d", "p-d", *opted, "standby-priority=10", vram=4 * GiB)
    run_gpu(c, gpu, "b", "p-b", *opted, vram=4 * GiB)
    run_gpu(c, gpu, "c", "p-c", *opted, vram=4 * GiB)
    for name in "dbc":
        wait_for(f"hookd to see {name}", lambda n=name: status_once_known(gpu, n).get("vram_bytes") == str(4 * GiB))  # type: ignore[misc]
    # b computes on its GPU: the GPU signal makes it the most recently active.
    gpu.node.set_utilization("p-b", 60)
    wait_for("b to be GPU-active", lambda: status(gpu, "b")["signals"].get("gpu") == "60%")  # type: ignore[union-attr]
    gpu.node.set_utilization("p-b", 0)

    kybernate(gpu, "wake", "a")  # needs 4 GiB, none free: d is skipped (priority), c is older than b
    assert running(c, gpu, "a", "p-a") and running(c, gpu, "b", "p-b") and running(c, gpu, "d", "p-d")
    assert parked(c, gpu, "c", "p-c")
    sc = status(gpu, "c")
    assert sc["parked_by"] == "arbiter" and "to make room for" in str(sc["reason"])
    decision = log_lines(gpu, "standby arbiter")[-1]
    assert "victims=" in decision and "d: priority 10 above 0" in decision

    # hookd restarted with a 9 GiB budget while c is parked: c is still managed; waking it (4 GiB) with
    # 12 GiB used of 9 needs 7 GiB parked: a and b (d's priority is above c's).
    standby(gpu, c, tmp_path, "--standby-gpu-budget", f"{G0}=9Gi")
    wait_for("the restarted hookd to know c", lambda: status_once_known(gpu, "c").get("state") == "parked", 30)
    kybernate(gpu, "wake", "c")
    assert running(c, gpu, "c", "p-c") and running(c, gpu, "d", "p-d")
    assert parked(c, gpu, "a", "p-a") and parked(c, gpu, "b", "p-b")
    # A 5 GiB budget with c and d (8 GiB) running: even parking c (d's priority is above a's) leaves only 1 GiB
    # for a's 4, so nothing is parked for nothing and the wake is refused, saying why.
    standby(gpu, c, tmp_path, "--standby-gpu-budget", f"{G0}=5Gi")
    wait_for("the restarted hookd to know a", lambda: status_once_known(gpu, "a").get("state") == "parked", 30)
    r = kybernate(gpu, "wake", "a", check=False)
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "no room" in r.stderr, r.stderr
    assert parked(c, gpu, "a", "p-a") and running(c, gpu, "d", "p-d") and running(c, gpu, "c", "p-c")
    metrics = log_lines(gpu, "standby parked")
    assert sum("trigger=arbiter" in line for line in metrics) == 3


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_a_wake_moves_to_the_allowed_gpu_with_room_and_a_refused_remap_falls_back_to_its_own(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:
    gpu.node.set_gpus([fakegpu.FakeGpu(G0, H100, 16 * GiB), fakegpu.FakeGpu(G1, H100, 16 * GiB)])
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    standby(gpu, c, tmp_path, "--standby-gpu-budget", f"{G0}=8Gi", "--standby-gpu-budget", f"{G1}=8Gi")
    opted = ("standby=true", "standby-idle=1h", "standby-wake=api")
    # a may use GPUs 0 and 1 (NVML indexes; the GPU it is parked from is always allowed); b and c fill GPU 0's
    # budget while a is parked.
    run_gpu(c, gpu, "a", "p-a", *opted, f"standby-gpus={G0},1", vram=4 * GiB)
    wait_for("hookd to see a", lambda: status_once_known(gpu, "a").get("vram_bytes") == str(4 * GiB))
    kybernate(gpu, "park", "a")
    run_gpu(c, gpu, "b", "p-b", *opted, vram=4 * GiB)
    run_gpu(c, gpu, "c", "p-c", *opted, vram=4 * GiB)
    for name in "bc":
        wait_for(f"hookd to see {name}", lambda n=name: status_once_known(gpu, n).get("vram_bytes") == str(4 * GiB))  # type: ignore[misc]

    kybernate(gpu, "wake", "a")  # GPU 0: 8 GiB used of 8; GPU 1 has room without parking anyone
    assert running(c, gpu, "a", "p-a") and gpu.node.state("p-a")["gpu"] == G1
    assert running(c, gpu, "b", "p-b") and running(c, gpu, "c", "p-c")
    choice = log_lines(gpu, "standby placement")[-1]
    assert f"own={G0}" in choice and f"gpu={G1}" in choice and "own GPU has no room without parking" in choice
    restore = [e for e in gpu.events("p-a") if e.op == "restore"][-1]
    assert restore.pairs == 1 and restore.gpu == G1 and restore.result == "CUDA_SUCCESS"
    assert wait_for("a's status on GPU 1", lambda: status(gpu, "a").get("gpus") == [G1], 30)

    # a's own GPU is now GPU 1. d and e fill its budget; c is parked, so GPU 0 has room. The driver refuses any
    # GPU pairs (as driver 580 does): the wake chosen for GPU 0 falls back to GPU 1, where the arbiter parks the
    # least recently active of d and e; a is never stranded.
    kybernate(gpu, "park", "a")
    kybernate(gpu, "park", "c")
    run_gpu(c, gpu, "d", "p-d", *opted, vram=4 * GiB, on=G1)
    run_gpu(c, gpu, "e", "p-e", *opted, vram=4 * GiB, on=G1)
    for name in "de":
        wait_for(f"hookd to see {name}", lambda n=name: status_once_known(gpu, n).get("vram_bytes") == str(4 * GiB))  # type: ignore[misc]
    gpu.node.set_faults(["restore fail CUDA_ERROR_INVALID_VALUE pairs"])
    kybernate(gpu, "wake", "a")
    assert running(c, gpu, "a", "p-a") and gpu.node.state("p-a")["gpu"] == G1
    assert f"gpu={G0}" in log_lines(gpu, "standby placement")[-1]
    refused = [line for line in gpu.log.read_text().splitlines() if "the driver refuses to restore onto another GPU"
               in line]
    assert len(refused) == 1 and "driver_error=CUDA_ERROR_INVALID_VALUE" in refused[0]
    tried, done = [e for e in gpu.events("p-a") if e.op == "restore"][-2:]
    assert (tried.pairs, tried.result) == (1, "CUDA_ERROR_INVALID_VALUE") and (done.pairs, done.gpu) == (0, G1)
    assert parked(c, gpu, "d", "p-d") and running(c, gpu, "e", "p-e")  # d: the least recently active
    assert status(gpu, "d")["parked_by"] == "arbiter"
    # Remembered: the next wake of a stays on its own GPU without a placement (its GPU has room again).
    placements = len(log_lines(gpu, "standby placement"))
    kybernate(gpu, "park", "a")
    kybernate(gpu, "wake", "a")
    assert running(c, gpu, "a", "p-a") and gpu.node.state("p-a")["gpu"] == G1
    assert len(log_lines(gpu, "standby placement")) == placements


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_a_failed_park_or_wake_leaves_the_workload_running(kyb_factory, gpu: GpuNode, tmp_path: Path,
                                                           version: str) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    standby(gpu, c, tmp_path)
    gpu.node.set_faults(["checkpoint fail proc=p-f"])
    run_gpu(c, gpu, "f", "p-f", "standby=true", "standby-idle=1s", "standby-wake=api")
    wait_for("a failed park", lambda: log_lines(gpu, "standby park failed; the workload runs on"), 60)
    assert running(c, gpu, "f", "p-f")
    assert "CUDA_ERROR_UNKNOWN" in str(status(gpu, "f")["last_error"])
    gpu.node.clear_faults()
    wait_for("the park once the fault is gone", lambda: parked(c, gpu, "f", "p-f"), 60)

    gpu.node.set_faults(["restore fail proc=p-f"])
    r = kybernate(gpu, "wake", "f", check=False)
    assert r.returncode == 1 and "ABORTED" in r.stderr
    # The shim paused it again with its GPU state in host RAM: containerd's view is the truth.
    assert parked(c, gpu, "f", "p-f")
    gpu.node.clear_faults()
    # The wanted wake is tried again by itself, and it ends running.
    woke = wait_for("the retried wake", lambda: running(c, gpu, "f", "p-f") and log_lines(gpu, "standby woke"), 60)
    assert "trigger=api" in woke[-1]  # the wake asked for through the API, done by its retry


def test_hookd_without_standby_says_so(gpu: GpuNode) -> None:
    r = kybernate(gpu, "status", check=False)
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr and "--standby" in r.stderr


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_the_arbiter_makes_room_before_a_container_that_states_its_vram_starts_and_holds_it(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:
    gpu.node.set_gpus([fakegpu.FakeGpu(G0, H100, 12 * GiB)])
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    standby(gpu, c, tmp_path)
    opted = ("standby=true", "standby-idle=1h", "standby-wake=api")
    for name, vram, more in (("a", 3 * GiB, ()), ("b", 4 * GiB, ()), ("c", 4 * GiB, ("standby-priority=10",))):
        run_gpu(c, gpu, name, f"p-{name}", *opted, *more, vram=vram)
        wait_for(f"hookd to see {name}", lambda n=name, v=vram: status_once_known(gpu, n).get("vram_bytes") == str(v))  # type: ignore[misc]
    # 11 of 12 GiB in use. d says it will use 4 GiB: a (the least recently active) is parked before d starts;
    # c's priority is above d's. d then loads only 1 GiB of its 4 so far.
    run_gpu(c, gpu, "d", "p-d", "vram-request=4Gi", vram=1 * GiB)
    assert running(c, gpu, "d", "p-d") and parked(c, gpu, "a", "p-a")
    assert running(c, gpu, "b", "p-b") and running(c, gpu, "c", "p-c")
    sa = status(gpu, "a")
    assert sa["parked_by"] == "arbiter" and "to make room for" in str(sa["reason"]) and "(start)" in str(sa["reason"])
    decision = log_lines(gpu, "standby arbiter")[-1]
    assert "for=start" in decision and "c: priority 10 above 0" in decision

    # 3 GiB are free, but d holds the 3 it did not load yet: a's wake (3 GiB) parks b rather than take them.
    kybernate(gpu, "wake", "a")
    assert running(c, gpu, "a", "p-a") and parked(c, gpu, "b", "p-b") and running(c, gpu, "d", "p-d")
    assert "held_for_starts=" in log_lines(gpu, "standby arbiter")[-1]

    # e wants 8 GiB: parking every eligible workload (a) would free 3 of them, so nothing is parked and e's
    # Start fails before anything ran, saying why.
    with pytest.raises(CtrError) as refused:
        run_gpu(c, gpu, "e", "p-e", "vram-request=8Gi", vram=1 * GiB)
    said = refused.value.stderr
    assert "not started (nothing ran)" in said and "vram-request" in said and "needs 8.00 GiB" in said, said
    assert task_status(c, "e") != "RUNNING"
    assert running(c, gpu, "a", "p-a") and running(c, gpu, "c", "p-c") and running(c, gpu, "d", "p-d")
    assert sum("trigger=arbiter" in line for line in log_lines(gpu, "standby parked")) == 2
    # An exec's Start asks nothing of the arbiter (d's request is for its task, which runs).
    c.ctr("tasks", "exec", "--exec-id", "probe", "d", "true")


def test_a_restore_at_start_gets_room_from_the_arbiter_for_what_its_checkpoint_held(
        kyb_factory, gpu: GpuNode, tmp_path: Path) -> None:
    gpu.node.set_gpus([fakegpu.FakeGpu(G0, H100, 12 * GiB)])
    c = kyb_factory("2.1", runtime_toml=gpu.runtime_toml())
    standby(gpu, c, tmp_path)
    run_gpu(c, gpu, "r", "p-r", vram=4 * GiB)
    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("r", exit=True)
        c.ctr("tasks", "delete", "r")
        opted = ("standby=true", "standby-idle=1h", "standby-wake=api")
        for name, more in (("a", ()), ("b", ()), ("c", ("standby-priority=10",))):
            run_gpu(c, gpu, name, f"p-{name}", *opted, *more, vram=4 * GiB)
            wait_for(f"hookd to see {name}", lambda n=name: status_once_known(gpu, n).get("vram_bytes") == str(4 * GiB))  # type: ignore[misc]
        # The GPU is full; r's checkpoint held 4 GiB: a (least recently active, priority 0) makes room.
        api.create_task_from_checkpoint("r", criu_checkpoint(descriptors))
        api.start_task("r")
    assert running(c, gpu, "r", "p-r") and parked(c, gpu, "a", "p-a")
    assert running(c, gpu, "b", "p-b") and running(c, gpu, "c", "p-c")
    assert "(restore)" in str(status(gpu, "a")["reason"])
    assert "for=restore" in log_lines(gpu, "standby arbiter")[-1]
