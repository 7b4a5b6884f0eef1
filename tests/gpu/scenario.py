#!/usr/bin/env python3
"""Drive the GPU checkpoint scenarios against a running containerd, timing every phase.

Started by tests/gpu/on_gpu.sh (which provisions containerd, runc, CRIU and the image first); it can
also be run by hand against any containerd 1.6+ that ctr reaches.

Runtimes:
  runc       the stock `io.containerd.runc.v2`; this script itself does the CUDA driver steps
             (lock + checkpoint before ctr freezes the task, restore + unlock after) from its own
             process through ctypes (tests/gpu/cudackpt.py): the raw floor Kybernate must approach.
  kybernate  `io.containerd.kybernate.v1` + kybernate-hookd do the GPU steps inside Pause /
             Checkpoint / Resume / Start: NOT YET WIRED (see KybernateSteps).

Scenarios (comma-separated, run in order, each in its own container):
  driver-floor   no containerd: workload as a plain host process, N cycles of lock/checkpoint/
                 restore/unlock (the driver alone).
  exit-restore   GPU lock+checkpoint → ctr c checkpoint --task --rw → kill, delete →
                 ctr c restore --live --rw → GPU restore+unlock on the new pid → verify.
  leave-running  GPU lock+checkpoint → ctr t checkpoint --image-path (raw CRIU dump, no content
                 store) → ctr c checkpoint --task --rw (full) → GPU restore+unlock, same pid → verify.
  pause-resume   GPU lock+checkpoint → ctr t pause → (VRAM is free) → ctr t resume → GPU
                 restore+unlock → verify (tier 1, hot standby).
  export-import  like exit-restore, plus ctr images export / rm / import of the checkpoint between.
  remap          like exit-restore, with an explicit GPU UUID pair on restore (identity on one
                 GPU; --remap-to other GPU index where there are several).
  programs       the GPU corpus (programs.py: a training loop with fork and with spawn DataLoader
                 workers, a torch.compile'd model, a CUDA-graph decode loop, a transformers generate
                 loop; --programs picks some). Each: an uninterrupted reference run as a host process
                 and the same program in a container, started together; at step --program-checkpoint-at
                 ctr c checkpoint --task --rw (the job runs on: its next steps are checked too) → kill,
                 delete → ctr c restore --live --rw → the restored job runs to --program-steps. Every
                 steps.log line of the container (before, after the checkpoint, after the restore) must
                 equal the reference's line for that step, byte for byte (losses as float.hex).
  resilience     (kybernate runtime; docs/resilience.md) (1) the training loop (programs.py train, fork
                 DataLoader workers) with kybernate.io/checkpoint-on-stop: at step --program-checkpoint-at
                 `ctr task kill -s SIGTERM` → the shim has hookd checkpoint it into the store and the task
                 exits through the dump → delete → a NEW container with kybernate.io/resume: latest runs on
                 to --program-steps; every steps.log line must equal an uninterrupted reference's, and
                 no step may be lost. (2) an inference-style server (server.py: weights from a file, moved
                 to the GPU, warmed up): time from `ctr run` to the first answer, cold; SIGTERM with
                 checkpoint-on-stop; then from `ctr run` with resume: latest to the first answer, restored;
                 the restored server must give the same answer to the same request.
  remap2         (kybernate runtime, two GPUs; issue 17) the workload on GPU 0 (every GPU's device node
                 visible, CUDA_DEVICE_ORDER=PCI_BUS_ID) restored onto GPU 1 twice: (a) created with
                 kybernate.io/gpu-map=<gpu0>=<gpu1>, ctr c checkpoint --task --rw → kill, delete → ctr c
                 restore --live --rw; (b) `kybernate checkpoint` into the store → a NEW container with
                 kybernate.io/restore-from: store:<key> and NVIDIA_VISIBLE_DEVICES=<gpu1>. Each: counter
                 continues, checksum identical, and the process is on GPU 1 afterwards (nvidia-smi's
                 compute apps; the fake driver's record with --no-gpu), hookd's `restored` log line.
  ddp            (kybernate runtime, two GPUs; issue 17) programs.py ddp (two ranks, NCCL, one per GPU)
                 in one container next to an uninterrupted host reference with the same NCCL settings:
                 ctr t pause → resume at --ddp-pause-at, ctr c checkpoint --task --rw at
                 --ddp-checkpoint-at → kill, delete → ctr c restore --live --rw → last step; every line
                 must equal the reference's. Tried with DDP_SETTINGS in order (default, NCCL_P2P_DISABLE=1,
                 + NCCL_SHM_DISABLE=1) until one works; every attempt's errors (ctr's, the CRIU logs,
                 hookd's log) are recorded. --no-gpu: the py backend, its two ranks fake CUDA processes
                 of the fake driver's two GPUs.
  pair           (kybernate runtime, two GPUs; issue 17) two workloads (workload.py), one per GPU
                 (CUDA_VISIBLE_DEVICES=i, NVIDIA_VISIBLE_DEVICES=<uuid i>); for GPU 0's alone, GPU 1's
                 alone, then both started together: ctr t pause, ctr t resume (verified), ctr c checkpoint
                 --task --rw (then kill, delete), ctr c restore --live --rw (verified: counter continues,
                 checksum identical, still on its own GPU). Each step: each container's ctr seconds, the
                 pair's wall seconds, hookd's driver seconds and calls summed over the step's containers.

Verification: the workload's counter must continue past its pre-checkpoint value and its checksum
must equal the reference taken at start (ok=True).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ALL_SCENARIOS = ("driver-floor", "exit-restore", "leave-running", "pause-resume", "export-import", "remap", "programs",
                 "store", "resilience", "remap2", "ddp", "pair")
# pair: the steps, in order, for GPU 0's workload alone, GPU 1's alone, then both at once.
PAIR_STEPS = ("pause", "resume", "checkpoint", "restore")
# The media types of a containerd checkpoint image's index entries.
CRIU_TAR = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
CKPT_CONFIG = "application/vnd.containerd.container.checkpoint.config.v1+proto"

# ddp: NCCL settings tried in order until pause/resume and checkpoint/restore work (NVLink multicast always off).
DDP_SETTINGS = {
    "default": {},
    "p2p-off": {"NCCL_P2P_DISABLE": "1"},
    "p2p-shm-off": {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"},
}
# The GPU corpus (programs.py), as the `programs` scenario runs it: name -> programs.py arguments.
PROGRAMS = {
    "train-fork": ["train", "--workers-start", "fork"],
    "train-spawn": ["train", "--workers-start", "spawn"],
    "compile": ["compile"],
    "graph-decode": ["graph-decode"],
    "hf-generate": ["hf-generate"],
}
RUNTIME_NAMES = {"runc": "io.containerd.runc.v2", "kybernate": "io.containerd.kybernate.v1"}
PASS_ENV = re.compile(r"^(PATH|LD_LIBRARY_PATH|LANG|LC_ALL|CUDA_.*|NVIDIA_.*|NCCL_.*|TORCH_.*|NVSHMEM_.*|"
                      r"PYTORCH_.*|TRITON_.*)$")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class StepError(RuntimeError):
    pass


class NotWired(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# ctr wrapper: every command is timed and recorded verbatim
# ---------------------------------------------------------------------------------------------
@dataclass
class Ctr:
    binary: str
    address: str
    namespace: str
    commands: list = field(default_factory=list)

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--address", self.address, "--namespace", self.namespace, *args]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> tuple[float, str]:
        argv = self.argv(*args)
        t = time.perf_counter()
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
            rc, out = p.returncode, (p.stdout + p.stderr).strip()
        except subprocess.TimeoutExpired as e:
            rc, out = 124, f"timeout after {timeout}s: {e.stdout or ''}{e.stderr or ''}"
        dt = time.perf_counter() - t
        dt = round(dt, 3)
        self.commands.append({"cmd": shlex.join(argv), "rc": rc, "s": dt, "out": out[-2000:]})
        if check and rc != 0:
            raise StepError(f"ctr {' '.join(args[:3])} failed rc={rc}: {out[-1500:]}")
        return dt, out

    def task_pid(self, cid: str) -> int:
        _, out = self.run("task", "ls")
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == cid:
                return int(parts[1])
        raise StepError(f"no task {cid} in `ctr task ls`: {out}")

    def task_status(self, cid: str) -> str:
        _, out = self.run("task", "ls", check=False)
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == cid:
                return parts[2]
        return "ABSENT"

    def remove(self, cid: str) -> float:
        """Kill (SIGKILL), delete the task, delete the container; return the seconds it took."""
        t = time.perf_counter()
        if self.task_status(cid) != "ABSENT":
            self.run("task", "kill", "--signal", "SIGKILL", cid, check=False)
            for _ in range(100):
                if self.task_status(cid) in ("STOPPED", "ABSENT"):
                    break
                time.sleep(0.05)
            self.run("task", "delete", cid, check=False)
        self.run("container", "delete", cid, check=False)
        return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# GPU step strategies
# ---------------------------------------------------------------------------------------------
def _nvidia_fds(pid: int) -> int:
    n = 0
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            if os.readlink(fd).startswith("/dev/nvidia"):
                n += 1
        except OSError:
            pass
    return n


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


class Vram:
    """Used VRAM of GPU 0 in MiB through NVML (nvidia-ml-py), else nvidia-smi, else -1."""

    def __init__(self) -> None:
        self.nvml = None
        try:
            import pynvml  # type: ignore

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - optional
            self.nvml = None

    def used_mib(self) -> float:
        if self.nvml is not None:
            return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / (1 << 20)
        if shutil.which("nvidia-smi"):
            p = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                               capture_output=True, text=True)
            try:
                return float(p.stdout.strip().splitlines()[0])
            except (ValueError, IndexError):
                return -1.0
        return -1.0


class RuncSteps:
    """runc runtime: this process does the driver steps itself, resident (cuInit once)."""

    name = "runc"

    lock_timeout_ms = 10000  # the driver's own lock timeout
    big_timeout = 120.0  # checkpoint / restore; set from --vram-gib by the Runner

    def __init__(self, no_gpu: bool) -> None:
        self.no_gpu = no_gpu
        self.drv = None
        self.vram = None
        if not no_gpu:
            from cudackpt import Driver

            self.drv = Driver()
            self.vram = Vram()

    def _bounded(self, what: str, timeout: float, fn, *args):
        """Run one driver call in a thread so that a hung call costs a scenario, not the run."""
        box: dict = {}

        def body() -> None:
            try:
                box["v"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                box["e"] = e

        th = threading.Thread(target=body, name=what, daemon=True)
        th.start()
        th.join(timeout)
        if th.is_alive():
            raise StepError(f"{what} still running after {timeout:.0f}s (hung?)")
        if "e" in box:
            raise box["e"]
        return box["v"]

    def info(self) -> dict:
        if self.drv is None:
            return {"gpu": False}
        return {"gpu": True, "libcuda": self.drv.path, "cuda_driver_version": self.drv.cuda_version,
                "cuInit_s": round(self.drv.init_s, 3), "uuids": self.drv.device_uuids(),
                "nvml": self.vram.nvml is not None}

    def freeze(self, pid: int, rec: dict) -> None:
        """Lock + checkpoint (VRAM → host RAM). Must happen BEFORE any cgroup freeze."""
        if self.drv is None:
            return
        rec["vram_used_mib_before"] = round(self.vram.used_mib(), 1)
        rec["rss_mib_before"] = round(_rss_mib(pid), 1)
        rec["nvidia_fds_before"] = _nvidia_fds(pid)
        rec["gpu_lock_s"] = round(self._bounded("lock", 30, self.drv.lock, pid, self.lock_timeout_ms), 4)
        rec["gpu_checkpoint_s"] = round(self._bounded("checkpoint", self.big_timeout, self.drv.checkpoint, pid), 4)
        rec["state_after_checkpoint"] = self.drv.state(pid)
        rec["vram_used_mib_checkpointed"] = round(self.vram.used_mib(), 1)
        rec["rss_mib_checkpointed"] = round(_rss_mib(pid), 1)
        rec["nvidia_fds_checkpointed"] = _nvidia_fds(pid)

    def thaw(self, pid: int, rec: dict, pairs: list[tuple[str, str]] | None = None) -> None:
        """Restore (host RAM → VRAM, optionally remapped) + unlock."""
        if self.drv is None:
            return
        rec["state_before_restore"] = self.drv.state(pid)
        try:
            rec["restore_tid"] = self.drv.restore_tid(pid)
        except Exception as e:  # noqa: BLE001 - informative only
            rec["restore_tid"] = str(e)
        rec["gpu_restore_s"] = round(self._bounded("restore", self.big_timeout, self.drv.restore, pid, pairs), 4)
        rec["gpu_unlock_s"] = round(self._bounded("unlock", 30, self.drv.unlock, pid), 4)
        rec["state_after_unlock"] = self.drv.state(pid)
        rec["vram_used_mib_after"] = round(self.vram.used_mib(), 1)
        rec["rss_mib_after"] = round(_rss_mib(pid), 1)


class KybernateSteps:
    """kybernate runtime: the shim + hookd do every GPU step inside the ctr calls; this script only drives
    ctr and reads what happened: hookd's metrics (driver step durations) and the shim's per-RPC timings
    from containerd's log. It calls the driver only to read a process's state (cuCheckpointProcessGetState).
    """

    name = "kybernate"
    big_timeout = 120.0

    def __init__(self, no_gpu: bool, metrics_url: str, containerd_log: str) -> None:
        self.no_gpu = no_gpu
        self.metrics_url = metrics_url
        self.containerd_log = containerd_log
        self.drv = None
        self.vram = None
        self._metrics0: dict[str, float] = {}
        self._log_offset = 0
        if not no_gpu:
            from cudackpt import Driver

            self.drv = Driver()
            self.vram = Vram()

    def info(self) -> dict:
        info: dict = {"gpu": not self.no_gpu, "hookd_metrics": self.metrics_url}
        if self.drv is not None:
            info.update(libcuda=self.drv.path, cuda_driver_version=self.drv.cuda_version, uuids=self.drv.device_uuids())
        return info

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("kybernate_hookd_step_duration_seconds_sum") or \
               line.startswith("kybernate_hookd_step_duration_seconds_count") or \
               line.startswith("kybernate_hookd_bytes_total"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def vram_mib(self) -> float | None:
        return round(self.vram.used_mib(), 1) if self.vram is not None else None

    def freeze(self, pid: int, rec: dict) -> None:
        """Nothing to do: the shim checkpoints the GPU inside Pause. Take the 'before' readings."""
        self._metrics0 = self.metrics()
        try:
            self._log_offset = os.path.getsize(self.containerd_log)
        except OSError:
            self._log_offset = 0
        rec["vram_used_mib_before"] = self.vram_mib()
        rec["rss_mib_before"] = round(_rss_mib(pid), 1)

    def thaw(self, pid: int, rec: dict, pairs: list[tuple[str, str]] | None = None) -> None:
        """Nothing to do: the shim restored the GPU inside Resume / Start. Record what hookd and the shim did."""
        rec.update(hookd_deltas(self._metrics0, self.metrics()))
        rec["shim_rpc_ms"] = self.shim_rpcs()
        if self.drv is not None:
            try:
                rec["state_after_unlock"] = self.drv.state(pid)
            except Exception as e:  # noqa: BLE001 - the init of a multi-process job may hold no CUDA context
                rec["state_after_unlock"] = f"no CUDA state for pid {pid}: {e}"
        rec["vram_used_mib_after"] = self.vram_mib()

    def shim_rpcs(self) -> list[tuple[str, float]]:
        """(method, ms) of every intercepted call our shim answered since freeze(), from containerd's log."""
        import re

        found = []
        try:
            with open(self.containerd_log, errors="replace") as f:
                f.seek(self._log_offset)
                for line in f:
                    m = re.search(r"rpc=containerd\.task\.v[23]\.Task/(\w+) code=(\w+) ms=([\d.]+)", line)
                    if m and m.group(1) in ("Create", "Start", "Pause", "Resume", "Checkpoint", "Delete"):
                        found.append((f"{m.group(1)}:{m.group(2)}", float(m.group(3))))
        except OSError:
            pass
        return found


def hookd_deltas(before: dict[str, float], after: dict[str, float]) -> dict:
    """hookd's driver seconds and calls per step and bytes moved between two readings of its metrics."""
    rec: dict = {}
    for step in ("lock", "checkpoint", "restore", "unlock"):
        key = f'kybernate_hookd_step_duration_seconds_sum{{step="{step}"}}'
        count = f'kybernate_hookd_step_duration_seconds_count{{step="{step}"}}'
        rec[f"gpu_{step}_s"] = round(after.get(key, 0.0) - before.get(key, 0.0), 4)
        rec[f"gpu_{step}_calls"] = int(after.get(count, 0.0) - before.get(count, 0.0))
    for direction in ("device_to_host", "host_to_device"):
        key = f'kybernate_hookd_bytes_total{{direction="{direction}"}}'
        rec[f"bytes_{direction}"] = int(after.get(key, 0.0) - before.get(key, 0.0))
    return rec


# ---------------------------------------------------------------------------------------------
# workload helpers
# ---------------------------------------------------------------------------------------------
@dataclass
class PairMember:
    """One workload of the pair scenario: its container, results dir, fake-driver id, GPU, reference checksum."""

    cid: str
    out: str
    proc: str
    gpu: str
    ref: str
    before: dict = field(default_factory=dict)  # its status before the last pause / checkpoint

    def image(self) -> str:
        return f"kybernate.test/ckpt/{self.cid}:1"


def read_status(out_dir: str) -> dict:
    try:
        with open(os.path.join(out_dir, "status")) as f:
            line = f.read().strip()
    except OSError:
        return {}
    d = {"raw": line}
    for tok in line.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            d[k] = v
        else:
            d["kind"] = tok
    return d


def wait_status(out_dir: str, pred, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    st: dict = {}
    while time.monotonic() < deadline:
        st = read_status(out_dir)
        if st and pred(st):
            return st
        time.sleep(0.05)
    raise StepError(f"timeout ({timeout}s) waiting for {what}; last status: {st.get('raw')!r}")


def ready_checksum(out_dir: str) -> str:
    with open(os.path.join(out_dir, "workload.log")) as f:
        for line in f:
            if line.startswith("ready "):
                return line.split("checksum=", 1)[1].split()[0]
    raise StepError("no ready line in workload.log")


def verify_continues(out_dir: str, before: dict, ref: str, t_unlock_wall: float, timeout: float = 60) -> dict:
    c0 = int(before.get("counter", 0))
    st = wait_status(out_dir, lambda s: "counter" in s and int(s["counter"]) >= c0 + 2,
                     timeout, f"counter > {c0 + 1} after restore")
    first_after = None
    with open(os.path.join(out_dir, "workload.log")) as f:
        for line in f:
            m = re.match(r"counter=(\d+) .*ts=([\d.]+)", line)
            if m and int(m.group(1)) == c0 + 1:
                first_after = float(m.group(2))
    ok = st.get("ok") == "True" and st.get("checksum") == ref
    res = {"counter_before": c0, "counter_after": int(st["counter"]), "checksum_after": st.get("checksum"),
           "checksum_ref": ref, "ok_flag": st.get("ok"), "verified": ok}
    if first_after is not None and "ts" in before:
        res["workload_gap_s"] = round(first_after - float(before["ts"]), 3)
        res["first_tick_after_unlock_s"] = round(first_after - t_unlock_wall, 3)
    if not ok:
        raise StepError(f"verification failed: {res}")
    return res


def container_env() -> list[str]:
    env = [f"{k}={v}" for k, v in sorted(os.environ.items())
           if PASS_ENV.match(k) and not k.startswith("NVIDIA_REQUIRE")]
    env += ["HOME=/tmp", "USER=root", "PYTHONUNBUFFERED=1", "PYTHONDONTWRITEBYTECODE=1", "KYB_OUT_DIR=/out"]
    return env


def host_binds(extra_paths: list[str]) -> list[str]:
    """Host paths to bind read-only so that the host python + torch + driver libs run inside.

    Top-level directories (non-recursive bind: CRIU must know every mount as external, which runc
    only declares for mounts in the spec) plus every host mount point below them, parents first.
    """
    import importlib.util

    wanted = ["/usr", "/etc", sys.executable, os.path.realpath(sys.executable), sys.prefix, sys.base_prefix,
              "/usr/local/nvidia"] + extra_paths
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        wanted.append(os.path.dirname(spec.origin))
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        p = "/" + name
        if os.path.isdir(p) and not os.path.islink(p):
            wanted.append(p)
    skip = {"", "proc", "sys", "dev", "tmp", "run", "out", "kyb", "bb"}
    tops = []
    for p in wanted:
        if not p or not os.path.exists(p):
            continue
        top = "/" + p.strip("/").split("/")[0]
        if top.strip("/") in skip or top in tops:
            continue
        tops.append(top)
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if any(mp.startswith(t + "/") for t in tops) and mp not in mounts:
                mounts.append(mp)
    mounts.sort(key=lambda m: m.count("/"))
    return tops + mounts


# ---------------------------------------------------------------------------------------------
# the scenarios
# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.ctr = Ctr(a.ctr, a.address, a.namespace)
        self.save = lambda: None  # main() sets it: writes results.json (a run cut short keeps what it measured)
        # The raw floor is always the driver alone, called from here; the scenarios use the runtime's way.
        self.floor = RuncSteps(a.no_gpu)
        self.floor.big_timeout = max(60.0, 6.0 * a.vram_gib)
        if a.runtime == "kybernate":
            self.steps = KybernateSteps(a.no_gpu, a.hookd_metrics, os.path.join(a.base, "containerd.log"))
        else:
            self.steps = self.floor
        self.steps.big_timeout = max(60.0, 6.0 * a.vram_gib)
        self.backend = "py" if a.no_gpu else "torch"
        self.binds = host_binds(a.bind or [])
        self.devices = sorted(p for p in glob.glob("/dev/nvidia*") if not os.path.isdir(p)) if not a.no_gpu else []

    # -- containers ---------------------------------------------------------------------------
    def out_dir(self, name: str) -> str:
        d = os.path.join(self.a.base, "out", name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        return d

    def start_container(self, cid: str, out: str, command: list[str] | None = None,
                        annotations: dict[str, str] | None = None, vram_gib: float | None = None,
                        env: list[str] | None = None, mounts: list[str] | None = None,
                        runtime_config: str = "") -> tuple[float, list[str]]:
        args = ["run", "-d", "--runtime", RUNTIME_NAMES[self.a.runtime], "--cwd", "/",
                "--log-uri", f"file://{out}/stdout.log"]
        if runtime_config:
            args += ["--runtime-config-path", runtime_config]
        for m in mounts or []:
            args += ["--mount", m]
        for k, v in (annotations or {}).items():
            args += ["--annotation", f"{k}={v}"]
        if self.a.snapshotter:
            args += ["--snapshotter", self.a.snapshotter]
        if not self.a.own_netns:
            args.append("--net-host")  # host netns: CRIU then needs no `ip`/`iptables-save`
        for dev in self.devices:
            args += ["--device", dev]
        for b in self.binds:
            args += ["--mount", f"type=bind,src={b},dst={b},options=bind:ro"]
        args += ["--mount", f"type=bind,src={out},dst=/out,options=bind:rw",
                 "--mount", f"type=bind,src={HERE},dst=/kyb,options=bind:ro"]
        overridden = {e.partition("=")[0] for e in env or []}
        for e in [e for e in container_env() if e.partition("=")[0] not in overridden] + (env or []):
            args += ["--env", e]
        vram = self.a.vram_gib if vram_gib is None else vram_gib
        command = command or [sys.executable, "/kyb/workload.py", "--vram-gib", str(vram),
                              "--out-dir", "/out", "--backend", self.backend]
        args += [self.a.image, cid, *command]
        dt, _ = self.ctr.run(*args, timeout=120)
        return dt, args

    def launch(self, name: str, rec: dict, vram_gib: float | None = None, annotations: dict[str, str] | None = None,
               env: list[str] | None = None, runtime_config: str = "") -> tuple[str, str, int, str]:
        cid = f"kyb-{name}"
        self.ctr.remove(cid)
        out = self.out_dir(name)
        dt, _ = self.start_container(cid, out, vram_gib=vram_gib, annotations=annotations, env=env,
                                     runtime_config=runtime_config)
        rec["ctr_run_s"] = round(dt, 3)
        t = time.perf_counter()
        wait_status(out, lambda s: "counter" in s and int(s["counter"]) >= 3, self.a.ready_timeout, "workload ticks")
        rec["workload_ready_s"] = round(time.perf_counter() - t, 2)
        ref = ready_checksum(out)
        pid = self.ctr.task_pid(cid)
        rec["pid"] = pid
        rec["checksum_ref"] = ref
        return cid, out, pid, ref

    def collect_logs(self, cid: str, rec: dict) -> None:
        """Copy CRIU / runc logs of this container (bundle, work dirs) next to the results."""
        dst = os.path.join(self.a.base, "logs", cid)
        os.makedirs(dst, exist_ok=True)
        pats = [os.path.join(self.a.state, "**", cid, "*.log"), os.path.join(self.a.state, "**", cid, "log.json"),
                os.path.join(self.a.base, "tmp", "**", "*.log"), os.path.join(self.a.base, "criu-work", "**", "*.log")]
        got = []
        for pat in pats:
            for f in glob.glob(pat, recursive=True):
                try:
                    target = os.path.join(dst, f.strip("/").replace("/", "_"))
                    shutil.copy(f, target)
                    got.append(target)
                except OSError:
                    pass
        rec["logs"] = got

    # -- scenarios ----------------------------------------------------------------------------
    def s_driver_floor(self, rec: dict) -> None:
        if self.a.no_gpu:
            raise StepError("driver-floor needs a GPU")
        out = self.out_dir("driver-floor")
        env = dict(os.environ, PYTHONUNBUFFERED="1", KYB_OUT_DIR=out)
        cmd = [sys.executable, os.path.join(HERE, "workload.py"), "--vram-gib", str(self.a.vram_gib),
               "--out-dir", out, "--backend", "torch"]
        rec["cmd"] = shlex.join(cmd)
        with open(os.path.join(out, "stdout.log"), "w") as so:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=so, stderr=subprocess.STDOUT, env=env)
        try:
            t = time.perf_counter()
            wait_status(out, lambda s: "counter" in s and int(s["counter"]) >= 3, self.a.ready_timeout, "ticks")
            rec["workload_ready_s"] = round(time.perf_counter() - t, 2)
            ref = ready_checksum(out)
            rec["pid"] = proc.pid
            rec["cycles"] = []
            for i in range(self.a.cycles):
                cyc: dict = {}
                before = read_status(out)
                t0 = time.perf_counter()
                self.floor.freeze(proc.pid, cyc)
                self.floor.thaw(proc.pid, cyc)
                t_wall = time.time()  # after unlock
                cyc["total_s"] = round(time.perf_counter() - t0, 3)
                cyc.update(verify_continues(out, before, ref, t_wall))
                rec["cycles"].append(cyc)
                log(f"driver-floor cycle {i}: {cyc}")
        finally:
            proc.kill()
            proc.wait()

    def _checkpoint_restore(self, name: str, rec: dict, export: bool = False, remap: bool = False) -> None:
        cid, out, pid, ref = self.launch(name, rec)
        ref_img = f"kybernate.test/ckpt/{name}:1"
        self.ctr.run("images", "rm", ref_img, check=False)
        before = read_status(out)
        t0 = time.perf_counter()
        self.steps.freeze(pid, rec)
        try:
            rec["ctr_checkpoint_s"], _ = self.ctr.run("container", "checkpoint", "--task", "--rw", cid, ref_img,
                                                      timeout=self.a.step_timeout)
        except StepError:
            self.collect_logs(cid, rec)
            raise
        rec["checkpoint_image_bytes"] = self.image_size(ref_img)
        rec["delete_s"] = round(self.ctr.remove(cid), 3)
        if export:
            tar = os.path.join(self.a.base, "tmp", f"{name}.tar")
            rec["export_s"], _ = self.ctr.run("images", "export", "--skip-manifest-json", "--all-platforms", tar,
                                              ref_img, timeout=self.a.step_timeout)
            rec["export_tar_bytes"] = os.path.getsize(tar)
            rec["image_rm_s"], _ = self.ctr.run("images", "rm", "--sync", ref_img)
            rec["import_s"], _ = self.ctr.run("images", "import", "--no-unpack", "--all-platforms", tar,
                                              timeout=self.a.step_timeout)
            os.unlink(tar)
        try:
            rec["ctr_restore_s"], _ = self.ctr.run("container", "restore", "--live", "--rw", cid, ref_img,
                                                   timeout=self.a.step_timeout)
        except StepError:
            self.collect_logs(cid, rec)
            raise
        new_pid = self.ctr.task_pid(cid)
        rec["restored_pid"] = new_pid
        pairs = None
        if remap:
            uuids = self.steps.info().get("uuids", [])
            if uuids:
                src = uuids[self.a.gpu_index]
                dst = uuids[self.a.remap_to if self.a.remap_to is not None else self.a.gpu_index]
                pairs = [(src, dst)]
                rec["gpu_pairs"] = pairs
        self.steps.thaw(new_pid, rec, pairs)
        t_wall = time.time()  # after unlock
        rec["total_s"] = round(time.perf_counter() - t0, 3)
        rec.update(verify_continues(out, before, ref, t_wall))
        self.ctr.remove(cid)
        self.ctr.run("images", "rm", ref_img, check=False)

    def s_exit_restore(self, rec: dict) -> None:
        self._checkpoint_restore("exit-restore", rec)

    def s_export_import(self, rec: dict) -> None:
        self._checkpoint_restore("export-import", rec, export=True)

    def s_remap(self, rec: dict) -> None:
        self._checkpoint_restore("remap", rec, remap=True)

    def s_leave_running(self, rec: dict) -> None:
        cid, out, pid, ref = self.launch("leave-running", rec)
        ref_img = "kybernate.test/ckpt/leave-running:1"
        self.ctr.run("images", "rm", ref_img, check=False)
        img_dir = os.path.join(self.a.base, "tmp", "raw-ckpt")
        work_dir = os.path.join(self.a.base, "criu-work", "leave-running")
        for d in (img_dir, work_dir):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        before = read_status(out)
        t0 = time.perf_counter()
        self.steps.freeze(pid, rec)
        try:
            rec["ctr_task_checkpoint_raw_s"], _ = self.ctr.run(
                "task", "checkpoint", "--image-path", img_dir, "--work-path", work_dir, cid,
                timeout=self.a.step_timeout)
            rec["raw_image_bytes"] = dir_size(img_dir)
            shutil.rmtree(img_dir, ignore_errors=True)
            rec["ctr_checkpoint_s"], _ = self.ctr.run("container", "checkpoint", "--task", "--rw", cid, ref_img,
                                                      timeout=self.a.step_timeout)
            rec["checkpoint_image_bytes"] = self.image_size(ref_img)
        except StepError:
            self.collect_logs(cid, rec)
            raise
        rec["task_status_after"] = self.ctr.task_status(cid)
        self.steps.thaw(pid, rec)
        t_wall = time.time()  # after unlock
        rec["total_s"] = round(time.perf_counter() - t0, 3)
        rec.update(verify_continues(out, before, ref, t_wall))
        self.collect_logs(cid, rec)
        self.ctr.remove(cid)
        self.ctr.run("images", "rm", ref_img, check=False)

    def s_pause_resume(self, rec: dict) -> None:
        cid, out, pid, ref = self.launch("pause-resume", rec)
        before = read_status(out)
        t0 = time.perf_counter()
        self.steps.freeze(pid, rec)
        rec["ctr_pause_s"], _ = self.ctr.run("task", "pause", cid)
        rec["task_status_paused"] = self.ctr.task_status(cid)
        if self.steps.vram is not None:
            rec["vram_used_mib_paused"] = round(self.steps.vram.used_mib(), 1)  # hot standby: VRAM released
        time.sleep(1.0)  # parked: tier 1, VRAM free for others
        rec["ctr_resume_s"], _ = self.ctr.run("task", "resume", cid)
        self.steps.thaw(pid, rec)
        t_wall = time.time()  # after unlock
        rec["total_s_incl_1s_parked"] = round(time.perf_counter() - t0, 3)
        rec.update(verify_continues(out, before, ref, t_wall))
        self.ctr.remove(cid)

    # -- the checkpoint store (docs/store.md) ------------------------------------------------------
    def s_store(self, rec: dict) -> None:
        """`kybernate checkpoint` into the store at each --store-sizes, against the floors of the same
        run: the GPU checkpoint (hookd's metrics) + CRIU's own dump time (its dump.log), and the disk's
        plain write rate; then a new container restores from `store:<key>` and the workload is verified."""
        if self.a.runtime != "kybernate":
            raise StepError("the store scenario needs --runtime kybernate")
        store = os.environ.get("KYBERNATE_STORE", "/var/lib/kybernate/store")
        os.makedirs(store, exist_ok=True)
        rec["store"] = store
        rec["disk_write"] = disk_write_rate(store, int(self.a.store_disk_floor_gib * (1 << 30)))
        log(f"store: disk floor {rec['disk_write']}")
        failed = []
        for size in [float(x) for x in self.a.store_sizes.split(",") if x.strip()]:
            sub: dict = {}
            rec[f"{size:g}gib"] = sub
            try:
                self._store_one(size, sub, store)
                sub["result"] = "PASS"
            except Exception as e:  # noqa: BLE001 - next size; recorded
                sub["result"] = "FAIL"
                sub["error"] = f"{type(e).__name__}: {e}"
                failed.append(f"{size:g}")
                for cid in ("kyb-store", "kyb-store-r"):
                    self.collect_logs(cid, sub)
                    self.ctr.remove(cid)
            log(f"store {size:g} GiB: {json.dumps({k: v for k, v in sub.items() if k != 'logs'}, default=str)}")
        if failed:
            raise StepError(f"store failed at {', '.join(failed)} GiB")

    def _store_one(self, size: float, rec: dict, store: str) -> None:
        key = f"gpu-store-{size:g}".replace(".", "-")
        shutil.rmtree(os.path.join(store, key), ignore_errors=True)
        cid, out, pid, ref = self.launch("store", rec, vram_gib=size)
        before = read_status(out)
        self.steps.freeze(pid, rec)  # metrics before
        cmd = [sys.executable, "-c", "import sys; from kybernate.hooks.cli.checkpoint_archive import main; "
               "sys.exit(main())", "checkpoint", cid, "--key", key, "--json", "--namespace", self.a.namespace]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.a.step_timeout)
        rec["kybernate_checkpoint_s"] = round(time.perf_counter() - t, 3)
        rec["cli_stderr"] = p.stderr[-2000:]
        if p.returncode != 0:
            raise StepError(f"kybernate checkpoint failed rc={p.returncode}: {p.stderr[-800:]}")
        result = json.loads(p.stdout.strip().splitlines()[-1])
        rec["cli_result"] = {k: v for k, v in result.items() if k != "gpu"}
        after = self.steps.metrics()
        for step in ("lock", "checkpoint"):
            k = f'kybernate_hookd_step_duration_seconds_sum{{step="{step}"}}'
            rec[f"gpu_{step}_s"] = round(after.get(k, 0.0) - self.steps._metrics0.get(k, 0.0), 4)
        gen_dir = result.get("path") or _newest_generation(store, key)
        rec["generation_dir"] = gen_dir
        rec["stored_bytes"] = dir_size(gen_dir)
        # CRIU's dump: its own log when kept, else the shim's Checkpoint RPC of the paused task (runc + CRIU
        # only: the GPU steps ran in Pause), from the shim's log lines in containerd's log.
        dump = criu_log_seconds(gen_dir, "dump.log")
        rpcs = self.steps.shim_rpcs()
        rec["shim_rpc_ms"] = rpcs
        if dump is None:
            dump = next((round(ms / 1000, 3) for m, ms in rpcs if m == "Checkpoint:OK"), None)
            rec["dump_source"] = "shim Checkpoint RPC (runc + CRIU)"
        rec["criu_dump_s"] = dump
        pages = sum(os.path.getsize(f) for f in glob.glob(os.path.join(gen_dir, "**", "pages-*.img"), recursive=True))
        rec["criu_pages_bytes"] = pages
        if dump:
            rec["criu_write_mb_s"] = round(pages / dump / 1e6, 1)
            floor = rec["gpu_lock_s"] + rec["gpu_checkpoint_s"] + dump
            rec["floor_s"] = round(floor, 3)
            rec["ratio_to_floor"] = round(rec["kybernate_checkpoint_s"] / floor, 3)
        rec["delete_s"] = round(self.ctr.remove(cid), 3)
        # Restore in a new container from the store; the same out dir, so the workload's open files are there.
        rid = "kyb-store-r"
        self.ctr.remove(rid)
        self.steps.freeze(pid, {})
        dt, _ = self.start_container(rid, out, vram_gib=size,
                                     annotations={"kybernate.io/restore-from": f"store:{key}"})
        rec["ctr_run_restore_s"] = round(dt, 3)
        new_pid = self.ctr.task_pid(rid)
        rec["restored_pid"] = new_pid
        self.steps.thaw(new_pid, rec)
        rec.update(verify_continues(out, before, ref, time.time()))
        self.collect_logs(rid, rec)
        self.ctr.remove(rid)
        shutil.rmtree(os.path.join(store, key), ignore_errors=True)

    # -- the GPU corpus (programs.py) ----------------------------------------------------------
    def s_programs(self, rec: dict) -> None:
        names = [n.strip() for n in self.a.programs.split(",") if n.strip()]
        unknown = [n for n in names if n not in PROGRAMS]
        if unknown:
            raise StepError(f"unknown programs {unknown}; known: {', '.join(PROGRAMS)}")
        failed = []
        for name in names:
            sub: dict = {}
            rec[name] = sub
            t = time.perf_counter()
            log(f"--- program {name} ---")
            try:
                self._program(name, PROGRAMS[name], sub)
                sub["result"] = "PASS"
            except Exception as e:  # noqa: BLE001 - next program; recorded
                sub["result"] = "FAIL"
                sub["error"] = f"{type(e).__name__}: {e}"
                failed.append(name)
                try:
                    self.collect_logs(f"kyb-p-{name}", sub)
                    self.ctr.remove(f"kyb-p-{name}")
                except Exception:  # noqa: BLE001
                    pass
            sub["wall_s"] = round(time.perf_counter() - t, 2)
            shown = {k: v for k, v in sub.items() if k != "logs"}
            log(f"program {name}: {sub['result']} {json.dumps(shown, default=str)}")
        if failed:
            raise StepError(f"programs failed: {', '.join(failed)}")

    def _program(self, name: str, args: list[str], rec: dict) -> None:
        cid = f"kyb-p-{name}"
        self.ctr.remove(cid)
        out, ref_out = self.out_dir(f"p-{name}"), self.out_dir(f"p-{name}-ref")
        steps, at = self.a.program_steps, self.a.program_checkpoint_at
        common = [*args, "--steps", str(steps), "--backend", self.backend]
        # The reference: the same program as a plain host process, uninterrupted, started alongside.
        ref_cmd = [sys.executable, os.path.join(HERE, "programs.py"), *common, "--out-dir", ref_out]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        with open(os.path.join(ref_out, "stdout.log"), "w") as so:
            ref = subprocess.Popen(ref_cmd, stdin=subprocess.DEVNULL, stdout=so, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        ref_img = f"kybernate.test/ckpt/p-{name}:1"
        self.ctr.run("images", "rm", ref_img, check=False)
        try:
            rec["ctr_run_s"], _ = self.start_container(
                cid, out, [sys.executable, "/kyb/programs.py", *common, "--out-dir", "/out"])
            t = time.perf_counter()
            wait_step(out, at, self.a.ready_timeout, f"{name} to reach step {at}")
            rec["ready_s"] = round(time.perf_counter() - t, 2)
            pid = self.ctr.task_pid(cid)
            rec["children_before"] = _children(pid)
            self.steps.freeze(pid, rec)
            rec["step_at_checkpoint"] = last_step(out)
            try:
                rec["ctr_checkpoint_s"], _ = self.ctr.run("container", "checkpoint", "--task", "--rw", cid, ref_img,
                                                          timeout=self.a.step_timeout)
            except StepError:
                self.collect_logs(cid, rec)
                raise
            rec["checkpoint_image_bytes"] = self.image_size(ref_img)
            rec["children_device_files_after_checkpoint"] = {c: _device_items(c) for c in _children(pid)}
            # Leave-running: the job goes on (its workers lost their inherited GPU files, if any).
            wait_step(out, rec["step_at_checkpoint"] + 5, 120, f"{name} to go on after the checkpoint")
            self.steps.thaw(pid, rec)
            rec["dropped_inherited"] = self.dropped_inherited()
            rec["delete_s"] = round(self.ctr.remove(cid), 3)
            rec["step_at_kill"] = last_step(out)
            offset = os.path.getsize(os.path.join(out, "steps.log"))
            try:
                rec["ctr_restore_s"], _ = self.ctr.run("container", "restore", "--live", "--rw", cid, ref_img,
                                                       timeout=self.a.step_timeout)
            except StepError:
                self.collect_logs(cid, rec)
                raise
            new_pid = self.ctr.task_pid(cid)
            rec["restored_pid"] = new_pid
            if self.steps.name == "runc":  # the stock runtime restores no GPU state: this script does
                self.steps.thaw(new_pid, rec.setdefault("restore_gpu", {}))
            wait_step(out, steps - 1, self.a.step_timeout, f"the restored {name} to finish", after=offset)
            wait_step(ref_out, steps - 1, self.a.step_timeout, f"the reference {name} to finish")
            rec.update(compare_steps(ref_out, out, offset, steps))
        finally:
            try:
                os.killpg(ref.pid, 9)
            except ProcessLookupError:
                pass
            ref.wait()
            self.collect_logs(cid, rec)
            self.ctr.remove(cid)
            self.ctr.run("images", "rm", ref_img, check=False)
        if not rec["identical"]:
            raise StepError(f"{name}: the restored run's steps differ from the reference: {rec['mismatches'][:3]}")

    # -- two GPUs (issue 17) ------------------------------------------------------------------------
    def _two_gpus(self) -> list[str]:
        uuids = gpu_uuids(self.a.no_gpu)
        if len(uuids) < 2:
            raise StepError(f"needs two GPUs, this machine has {uuids or 'none'}")
        return uuids

    def _fake_env(self, proc_id: str, uuid: str) -> list[str]:
        """--no-gpu: make the workload a fake CUDA process of the fake driver (its state dir, its id, its GPU)."""
        if not self.a.no_gpu or not os.environ.get("FAKEGPU_STATE_DIR"):
            return []
        return [f"FAKEGPU_STATE_DIR={os.environ['FAKEGPU_STATE_DIR']}", f"FAKEGPU_PROC={proc_id}",
                f"FAKEGPU_GPU={uuid}", f"FAKEGPU_VRAM={int(self.a.vram_gib * (1 << 30))}"]

    def s_remap2(self, rec: dict) -> None:
        if self.a.runtime != "kybernate":
            raise StepError("remap2 needs --runtime kybernate (the shim and hookd remap)")
        uuids = self._two_gpus()
        src, dst = uuids[0], uuids[1]
        rec["gpus"] = uuids
        failed = []
        for part in ("ctr", "restore-from"):
            sub: dict = {}
            rec[part] = sub
            try:
                self._remap2_one(part, src, dst, sub)
                sub["result"] = "PASS"
            except Exception as e:  # noqa: BLE001 - next part; recorded
                sub["result"] = "FAIL"
                sub["error"] = f"{type(e).__name__}: {e}"
                failed.append(part)
                for cid in (f"kyb-remap2-{part}", f"kyb-remap2-{part}-r"):
                    self.collect_logs(cid, sub)
                    self.ctr.remove(cid)
            sub["hookd_restored"] = hookd_lines(self.a.base, "restored")[-2:]
            log(f"remap2 {part}: {json.dumps({k: v for k, v in sub.items() if k != 'logs'}, default=str)}")
            self.save()
        if failed:
            raise StepError(f"remap2 failed: {', '.join(failed)}")

    def _remap2_one(self, part: str, src: str, dst: str, rec: dict) -> None:
        name = f"remap2-{part}"
        proc = f"p-{name}"
        # Every GPU's device node is in the container; CUDA sees --remap2-cuda-visible (default GPU 0 alone: the
        # driver wants a pair for every GPU a process checkpointed, and a CUDA runtime that enumerated both may
        # count both).
        visible = f"CUDA_VISIBLE_DEVICES={self.a.remap2_cuda_visible}"
        env = ["CUDA_DEVICE_ORDER=PCI_BUS_ID", visible, *self._fake_env(proc, src)]
        # kybernate.io/gpu: with --no-gpu there are no /dev/nvidia* devices to make it a GPU container.
        notes = {"kybernate.io/gpu": "true"}
        if part == "ctr":
            notes["kybernate.io/gpu-map"] = f"{src}={dst}"
        if part != "ctr":
            env.append(f"NVIDIA_VISIBLE_DEVICES={src}")
        cid, out, pid, ref = self.launch(name, rec, annotations=notes, env=env)
        rec["gpu_before"] = gpu_of(pid, proc, self.a.no_gpu)
        before = read_status(out)
        self.steps.freeze(pid, rec)
        if part == "ctr":
            ref_img = f"kybernate.test/ckpt/{name}:1"
            self.ctr.run("images", "rm", ref_img, check=False)
            rec["ctr_checkpoint_s"], _ = self.ctr.run("container", "checkpoint", "--task", "--rw", cid, ref_img,
                                                      timeout=self.a.step_timeout)
            rec["delete_s"] = round(self.ctr.remove(cid), 3)
            rec["ctr_restore_s"], _ = self.ctr.run("container", "restore", "--live", "--rw", cid, ref_img,
                                                   timeout=self.a.step_timeout)
            self.ctr.run("images", "rm", ref_img, check=False)
        else:
            key = "remap2"
            clear_key(self.a.store, key)
            cmd = [sys.executable, "-c", "import sys; from kybernate.hooks.cli.checkpoint_archive import main; "
                   "sys.exit(main())", "checkpoint", cid, "--key", key, "--json", "--namespace", self.a.namespace]
            t = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.a.step_timeout)
            rec["kybernate_checkpoint_s"] = round(time.perf_counter() - t, 3)
            if p.returncode != 0:
                raise StepError(f"kybernate checkpoint failed rc={p.returncode}: {p.stderr[-800:]}")
            rec["delete_s"] = round(self.ctr.remove(cid), 3)
            cid = f"{cid}-r"
            self.ctr.remove(cid)
            new_env = ["CUDA_DEVICE_ORDER=PCI_BUS_ID", visible, f"NVIDIA_VISIBLE_DEVICES={dst}",
                       *self._fake_env(proc, src)]
            rec["ctr_run_restore_s"], _ = self.start_container(
                cid, out, annotations={"kybernate.io/restore-from": f"store:{key}", "kybernate.io/gpu": "true"},
                env=new_env)
        new_pid = self.ctr.task_pid(cid)
        rec["restored_pid"] = new_pid
        self.steps.thaw(new_pid, rec)
        rec.update(verify_continues(out, before, ref, time.time()))
        rec["gpu_after"] = gpu_of(new_pid, proc, self.a.no_gpu)
        self.collect_logs(cid, rec)
        self.ctr.remove(cid)
        if part != "ctr":
            clear_key(self.a.store, "remap2")
        if rec["gpu_after"] != [dst]:
            raise StepError(f"the restored process is on {rec['gpu_after']}, not on GPU 1 {dst}")

    def s_ddp(self, rec: dict) -> None:
        if self.a.runtime != "kybernate":
            raise StepError("ddp needs --runtime kybernate")
        uuids = self._two_gpus()
        rec["gpus"] = uuids
        names = [n.strip() for n in self.a.ddp_settings.split(",") if n.strip()]
        unknown = [n for n in names if n not in DDP_SETTINGS]
        if unknown:
            raise StepError(f"unknown --ddp-settings {unknown}; known: {', '.join(DDP_SETTINGS)}")
        conf = os.path.join(self.a.base, "criu-ddp.conf")
        with open(conf, "w") as f:
            f.write("".join(o.strip() + "\n" for o in self.a.ddp_criu.split(",") if o.strip()))
        rec["criu_config"] = read_text(conf)
        rec["attempts"] = {}
        for name in names:
            sub: dict = {"env": {"NCCL_NVLS_ENABLE": "0", "NCCL_DEBUG": "WARN", **DDP_SETTINGS[name]}}
            rec["attempts"][name] = sub
            t = time.perf_counter()
            try:
                self._ddp_one(name, sub, conf, uuids)
                sub["result"] = "PASS"
            except Exception as e:  # noqa: BLE001 - next setting; recorded
                sub["result"] = "FAIL"
                sub["error"] = f"{type(e).__name__}: {e}"
                sub["hookd_errors"] = hookd_lines(self.a.base, "level=error", "level=warning")[-12:]
                sub["criu_errors"] = criu_errors(sub.get("logs", []))
            finally:
                self.ctr.remove(f"kyb-ddp-{name}")
            sub["wall_s"] = round(time.perf_counter() - t, 2)
            log(f"ddp {name}: {sub['result']} {json.dumps({k: v for k, v in sub.items() if k != 'logs'}, default=str)}")
            self.save()
            if sub["result"] == "PASS":
                rec["worked"] = name
                break
        if "worked" not in rec:
            raise StepError(f"ddp: no NCCL setting worked ({', '.join(names)}); see attempts")

    def _wait_alive(self, cid: str, out: str, step: int, timeout: float, what: str, after: int = 0) -> int:
        """wait_step, failing at once when the task has stopped (a rank that died ends the job)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return wait_step(out, step, min(5.0, max(0.1, deadline - time.monotonic())), what, after)
            except StepError:
                status = self.ctr.task_status(cid)
                if status not in ("RUNNING", "PAUSED") or time.monotonic() >= deadline:
                    tail = read_text(os.path.join(out, "stdout.log"))[-1500:]
                    raise StepError(f"{what}: task {status}, last step {last_step(out, after)}; output: {tail!r}")

    def _once_more(self, cid: str, rec: dict, what: str, *args: str) -> float:
        """A ctr step, tried a second time when the first fails and the task runs on (a lock that met one rank
        inside a collective times out, and hookd puts both back): both errors recorded."""
        t = time.monotonic()
        try:
            return self.ctr.run(*args, timeout=self.a.step_timeout)[0]
        except StepError as e:
            rec[f"{what}_first_error"] = str(e)[-1500:]
            if time.monotonic() - t > 30:  # a hang, not a race: the device time is better spent on the next setting
                raise
            rec[f"{what}_hookd_errors"] = hookd_lines(self.a.base, "level=error", "level=warning")[-6:]
            status = self.ctr.task_status(cid)
            rec[f"{what}_task_status_after_error"] = status
            if status != "RUNNING":
                raise
        time.sleep(1.0)
        return self.ctr.run(*args, timeout=self.a.step_timeout)[0]

    def _shm_dir(self, cid: str) -> str:
        path = os.path.join(self.a.base, "shm", cid)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, mode=0o1777)
        os.chmod(path, 0o1777)
        return path

    def _ddp_one(self, name: str, rec: dict, conf: str, uuids: list[str]) -> None:
        cid = f"kyb-ddp-{name}"
        self.ctr.remove(cid)
        out, ref_out = self.out_dir(f"ddp-{name}"), self.out_dir(f"ddp-{name}-ref")
        steps, pause_at, at = self.a.ddp_steps, self.a.ddp_pause_at, self.a.ddp_checkpoint_at
        common = ["ddp", "--steps", str(steps), "--interval", str(self.a.ddp_interval), "--backend", self.backend]
        nccl = [f"{k}={v}" for k, v in rec["env"].items()]
        ref_cmd = [sys.executable, os.path.join(HERE, "programs.py"), *common, "--out-dir", ref_out]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", CUDA_DEVICE_ORDER="PCI_BUS_ID",
                   CUDA_VISIBLE_DEVICES="0,1", **rec["env"])
        for k in ("FAKEGPU_STATE_DIR", "KYB_FAKE_GPUS"):
            env.pop(k, None)  # the reference is no fake CUDA process
        with open(os.path.join(ref_out, "stdout.log"), "w") as so:
            ref = subprocess.Popen(ref_cmd, stdin=subprocess.DEVNULL, stdout=so, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        ref_img = f"kybernate.test/ckpt/ddp-{name}:1"
        self.ctr.run("images", "rm", ref_img, check=False)
        fake = []
        if self.a.no_gpu and os.environ.get("FAKEGPU_STATE_DIR"):
            fake = [f"FAKEGPU_STATE_DIR={os.environ['FAKEGPU_STATE_DIR']}", f"KYB_FAKE_GPUS={','.join(uuids[:2])}",
                    f"KYB_FAKE_PROC=p-ddp-{name}"]
        try:
            rec["ctr_run_s"], _ = self.start_container(
                cid, out, [sys.executable, "/kyb/programs.py", *common, "--out-dir", "/out"],
                annotations={"org.criu.config": conf, "kybernate.io/gpu": "true"},
                env=["CUDA_DEVICE_ORDER=PCI_BUS_ID", "CUDA_VISIBLE_DEVICES=0,1", "NVIDIA_VISIBLE_DEVICES=all",
                     *nccl, *fake],
                # NCCL's shared-memory segments (two ranks, ~34 MB each) do not fit the default 64 MB /dev/shm
                # (seen on the H200 pair with NCCL_SHM_DISABLE=1: "No space left on device"): a host
                # directory instead, as a pod would mount a memory-backed emptyDir there.
                mounts=[f"type=bind,src={self._shm_dir(cid)},dst=/dev/shm,options=rbind:rw"])
            t = time.perf_counter()
            self._wait_alive(cid, out, pause_at, self.a.ready_timeout, f"ddp to reach step {pause_at}")
            rec["ready_s"] = round(time.perf_counter() - t, 2)
            pid = self.ctr.task_pid(cid)
            rec["processes"] = [pid, *_descendants(pid)]
            # 1. pause (the shim checkpoints both ranks' GPU state, then freezes) and resume.
            pause: dict = {}
            rec["pause_resume"] = pause
            self.steps.freeze(pid, pause)
            pause["pause_s"] = self._once_more(cid, pause, "pause", "task", "pause", cid)
            pause["step_at_pause"] = last_step(out)
            pause["vram_used_mib_paused"] = self.steps.vram_mib()
            time.sleep(1.0)
            pause["steps_while_paused"] = last_step(out) - pause["step_at_pause"]
            pause["resume_s"], _ = self.ctr.run("task", "resume", cid, timeout=self.a.step_timeout)
            self.steps.thaw(pid, pause)
            wait_step(out, pause["step_at_pause"] + 3, 120, "ddp to go on after the resume")
            self.save()
            # 2. checkpoint (leave running) at step `at`, kill, restore.
            ck: dict = {}
            rec["checkpoint_restore"] = ck
            wait_step(out, at, self.a.step_timeout, f"ddp to reach step {at}")
            self.steps.freeze(pid, ck)
            ck["step_at_checkpoint"] = last_step(out)
            ck["ctr_checkpoint_s"] = self._once_more(cid, ck, "checkpoint", "container", "checkpoint", "--task", "--rw",
                                                     cid, ref_img)
            ck["checkpoint_image_bytes"] = self.image_size(ref_img)
            wait_step(out, ck["step_at_checkpoint"] + 3, 120, "ddp to go on after the checkpoint")
            self.steps.thaw(pid, ck)
            self.save()
            ck["delete_s"] = round(self.ctr.remove(cid), 3)
            ck["step_at_kill"] = last_step(out)
            offset = os.path.getsize(os.path.join(out, "steps.log"))
            rs: dict = {}
            rec["restore"] = rs
            if not self.a.own_netns:
                # In the host's network namespace the killed ranks' TCP connections (NCCL's bootstrap and its
                # socket transport) sit in TIME_WAIT for 60 s, and CRIU's bind of the ranks' listening sockets
                # to their old ports fails with EADDRINUSE until then (seen on the H200 pair).
                rs["time_wait_s"] = 61.0
                time.sleep(61.0)
            self.steps.freeze(pid, rs)
            try:
                rs["ctr_restore_s"], _ = self.ctr.run("container", "restore", "--live", "--rw", cid, ref_img,
                                                      timeout=self.a.step_timeout)
            except StepError:
                self.collect_logs(cid, rec)
                raise
            new_pid = self.ctr.task_pid(cid)
            rs["restored_pid"] = new_pid
            self.steps.thaw(new_pid, rs)
            rs["gpus_after"] = {p: gpu_of(p, "", self.a.no_gpu) for p in [new_pid, *_descendants(new_pid)]}
            self._wait_alive(cid, out, steps - 1, self.a.step_timeout, "the restored ddp to finish", after=offset)
            wait_step(ref_out, steps - 1, self.a.step_timeout, "the reference ddp to finish")
            rec.update(compare_steps(ref_out, out, offset, steps))
        finally:
            try:
                os.killpg(ref.pid, 9)
            except ProcessLookupError:
                pass
            ref.wait()
            self.collect_logs(cid, rec)
            self.ctr.run("images", "rm", ref_img, check=False)
        if not rec["identical"]:
            raise StepError(f"ddp {name}: steps differ from the reference: {rec['mismatches'][:3]}")

    # -- preemption resilience (docs/resilience.md) ---------------------------------------------
    # -- per GPU and both GPUs at once (issue 17, item 4) -------------------------------------------
    def s_pair(self, rec: dict) -> None:
        """Two workloads, one per GPU; pause, resume, checkpoint, restore for GPU 0's alone, GPU 1's alone, both."""
        if self.a.runtime != "kybernate":
            raise StepError("pair needs --runtime kybernate (the shim and hookd do the GPU steps)")
        uuids = self._two_gpus()[:2]
        rec["gpus"] = uuids
        members: list[PairMember] = []
        try:
            for i, uuid in enumerate(uuids):
                name = f"pair-g{i}"
                proc = f"p-{name}"
                # CUDA sees its own GPU alone (PCI order = nvidia-smi's index order); NVIDIA_VISIBLE_DEVICES tells the
                # shim and hookd which GPU it is (the VRAM pre-check of the restore looks there).
                env = ["CUDA_DEVICE_ORDER=PCI_BUS_ID", f"CUDA_VISIBLE_DEVICES={i}", f"NVIDIA_VISIBLE_DEVICES={uuid}",
                       *self._fake_env(proc, uuid)]
                sub: dict = {"gpu": uuid}
                rec[f"g{i}"] = sub
                # Runtime options of its own (an empty TOML file: the shim's defaults). Without options containerd
                # 1.6.20's ctr still writes them into each checkpoint as an empty blob, whose digest it loses when
                # the blob exists already (a later checkpoint, the other container's): the image's index then holds
                # an empty digest and the restore fails with "unable to read checkpoint runtime". A blob with
                # content keeps its digest (containerd 2 skips empty options).
                conf = os.path.join(self.a.base, f"{name}-runtime.toml")
                with open(conf, "w") as f:
                    f.write(f"# {name}: the shim's defaults\n")
                cid, out, pid, ref = self.launch(name, sub, annotations={"kybernate.io/gpu": "true"}, env=env,
                                                 runtime_config=conf)
                sub["gpu_before"] = gpu_of(pid, proc, self.a.no_gpu)
                members.append(PairMember(cid, out, proc, uuid, ref))
            for mode, who in (("gpu0", members[:1]), ("gpu1", members[1:]), ("both", members)):
                rounds: dict = {}
                rec[mode] = rounds
                for step in PAIR_STEPS:
                    rounds[step] = self._pair_step(step, who, mode)
                    log(f"pair {mode} {step}: {json.dumps(rounds[step], default=str)}")
                    self.save()
        except Exception:
            for m in members:
                self.collect_logs(m.cid, rec.setdefault(f"logs_{m.cid}", {}))
            rec["hookd_errors"] = hookd_lines(self.a.base, "level=error", "level=warning")[-12:]
            raise
        finally:
            for m in members:
                self.ctr.remove(m.cid)
                self.ctr.run("images", "rm", m.image(), check=False)


    def _pair_step(self, step: str, who: list[PairMember], mode: str) -> dict:
        """One step for each of `who`, started together (a barrier); each one's ctr seconds, the pair's wall,
        hookd's driver seconds and calls over all of them; then what the step must have done, checked."""
        res: dict = {}
        for m in who:
            if step in ("pause", "checkpoint"):
                m.before = read_status(m.out)  # the state the resume / restore must continue from
            if step == "checkpoint":
                # The previous round's image goes first, with its blobs (--sync: garbage-collected now): containerd
                # 1.6 writes the checkpoint config (the same bytes for the same container every time) in the task
                # service, which fails with AlreadyExists when the blob is still there, and ctr ignores that
                # error: the image then silently lacks the CRIU checkpoint.
                self.ctr.run("images", "rm", "--sync", m.image(), check=False)
        metrics0 = self.steps.metrics()
        argv = {"pause": lambda m: ("task", "pause", m.cid), "resume": lambda m: ("task", "resume", m.cid),
                "checkpoint": lambda m: ("container", "checkpoint", "--task", "--rw", m.cid, m.image()),
                "restore": lambda m: ("container", "restore", "--live", "--rw", m.cid, m.image())}[step]
        t_wall0 = time.time()
        barrier = threading.Barrier(len(who))
        spans: dict[str, tuple[float, float]] = {}
        errors: dict[str, str] = {}

        def one(m: PairMember) -> None:
            barrier.wait(timeout=30)
            t = time.perf_counter()
            try:
                self.ctr.run(*argv(m), timeout=self.a.step_timeout)
            except Exception as e:  # noqa: BLE001 - reported for both after the join
                errors[m.cid] = f"{type(e).__name__}: {e}"
            spans[m.cid] = (t, time.perf_counter())

        threads = [threading.Thread(target=one, args=(m,), name=f"pair-{m.cid}") for m in who]
        for th in threads:
            th.start()
        for th in threads:
            th.join(self.a.step_timeout + 60)
        if len(spans) != len(who):
            raise StepError(f"pair {mode} {step}: a ctr call did not return within {self.a.step_timeout + 60} s")
        res["wall_s"] = round(max(e for _, e in spans.values()) - min(s for s, _ in spans.values()), 3)
        res["start_skew_s"] = round(max(s for s, _ in spans.values()) - min(s for s, _ in spans.values()), 4)
        for m in who:
            res[m.cid] = {"s": round(spans[m.cid][1] - spans[m.cid][0], 3)}
        res.update(hookd_deltas(metrics0, self.steps.metrics()))
        if errors:
            res["errors"] = errors
            raise StepError(f"pair {mode} {step} failed: {errors}")
        for m in who:  # outside the timed part: what the step must have done
            mine = res[m.cid]
            if step == "pause":
                mine["task_status"] = self.ctr.task_status(m.cid)
                if mine["task_status"] != "PAUSED":
                    raise StepError(f"pair {mode} pause: {m.cid} is {mine['task_status']}, not PAUSED")
            elif step == "checkpoint":
                mine["image_bytes"] = self.image_size(m.image())
                broken = self._incomplete_checkpoint(m.image())
                if broken:
                    raise StepError(f"pair {mode} checkpoint: {broken}")
                mine["delete_s"] = round(self.ctr.remove(m.cid), 3)  # the restore needs it gone
            else:  # resume, restore: the workload continues with its checksum
                pid = self.ctr.task_pid(m.cid)
                # A tick written after the step began (the status file still holds the killed task's last one).
                c0 = int(m.before.get("counter", 0))
                wait_status(m.out, lambda st, c0=c0: float(st.get("ts", 0)) > t_wall0
                            and int(st.get("counter", -1)) >= c0 + 2, 60, f"{m.cid}: a tick after the {step}")
                mine.update(verify_continues(m.out, m.before, m.ref, time.time()))
                mine["gpu_after"] = gpu_of(pid, m.proc, self.a.no_gpu)
                if mine["gpu_after"] != [m.gpu]:
                    raise StepError(f"pair {mode} {step}: {m.cid} is on {mine['gpu_after']}, not on {m.gpu}")
        return res

    def s_resilience(self, rec: dict) -> None:
        if self.a.runtime != "kybernate":
            raise StepError("resilience needs --runtime kybernate (checkpoint-on-stop and resume: latest are "
                            "the kybernate shim's)")
        failed = []
        for part, run in (("train", self._resilience_train), ("serve", self._resilience_serve)):
            sub: dict = {}
            rec[part] = sub
            t = time.perf_counter()
            log(f"--- resilience {part} ---")
            try:
                run(sub)
                sub["result"] = "PASS"
            except Exception as e:  # noqa: BLE001 - next part; recorded
                sub["result"] = "FAIL"
                sub["error"] = f"{type(e).__name__}: {e}"
                failed.append(part)
            sub["wall_s"] = round(time.perf_counter() - t, 2)
            log(f"resilience {part}: {sub['result']} {json.dumps(sub, default=str)}")
        if failed:
            raise StepError(f"resilience failed: {', '.join(failed)}")

    def _resilience_notes(self, key: str, resume: bool) -> dict[str, str]:
        notes = {"kybernate.io/checkpoint-key": key, "kybernate.io/checkpoint-on-stop": "true",
                 "kybernate.io/checkpoint-on-stop-timeout": f"{int(self.a.stop_timeout)}s"}
        if resume:
            notes["kybernate.io/resume"] = "latest"
        return notes

    def _stop_with_checkpoint(self, cid: str, key: str, rec: dict) -> None:
        """SIGTERM through the shim, as a kubelet's StopContainer sends it; the task must exit through the dump
        and a new generation of the key must be in the store."""
        before = store_generations(self.a.store, key)
        t = time.perf_counter()
        rec["kill_s"], _ = self.ctr.run("task", "kill", "--signal", "SIGTERM", cid, timeout=self.a.stop_timeout + 30)
        wait_for_status(self.ctr, cid, ("STOPPED", "ABSENT"), self.a.stop_timeout + 30)
        rec["stop_s"] = round(time.perf_counter() - t, 3)
        # The Kill is answered once the dump ended the task; hookd then hashes, writes the manifest, renames.
        deadline = time.monotonic() + self.a.stop_timeout
        while not set(after := store_generations(self.a.store, key)) - set(before) and time.monotonic() < deadline:
            time.sleep(0.1)
        rec["committed_s"] = round(time.perf_counter() - t, 3)
        rec["generations"] = after
        if not set(after) - set(before):
            raise StepError(f"no new generation of {key!r} in {self.a.store} after the stop (had {before}, "
                            f"have {after}): the checkpoint-on-stop failed; see hookd.log and containerd.log")
        rec["generation"] = max(after)
        rec["generation_bytes"] = dir_size(os.path.join(self.a.store, key, str(max(after))))
        rec["stop_log"] = self.stop_log_lines(cid)

    def _resilience_train(self, rec: dict) -> None:
        key, name = "resil-train", "train-fork"
        cid, cid2 = "kyb-r-train", "kyb-r-train-2"
        for c in (cid, cid2):
            self.ctr.remove(c)
        clear_key(self.a.store, key)
        out, ref_out = self.out_dir("r-train"), self.out_dir("r-train-ref")
        steps, at = self.a.program_steps, self.a.program_checkpoint_at
        common = [*PROGRAMS[name], "--steps", str(steps), "--backend", self.backend]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        with open(os.path.join(ref_out, "stdout.log"), "w") as so:
            ref = subprocess.Popen([sys.executable, os.path.join(HERE, "programs.py"), *common, "--out-dir", ref_out],
                                   stdin=subprocess.DEVNULL, stdout=so, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        command = [sys.executable, "/kyb/programs.py", *common, "--out-dir", "/out"]
        try:
            rec["ctr_run_s"], _ = self.start_container(cid, out, command, self._resilience_notes(key, resume=True))
            wait_step(out, at, self.a.ready_timeout, f"{name} to reach step {at}")
            rec["first_step"] = read_steps(out)[0][0]  # 0: the first container started fresh (no generation yet)
            self._stop_with_checkpoint(cid, key, rec)
            rec["step_at_stop"] = last_step(out)
            rec["delete_s"] = round(self.ctr.remove(cid), 3)
            offset = os.path.getsize(os.path.join(out, "steps.log"))
            t = time.perf_counter()
            rec["ctr_run_resume_s"], _ = self.start_container(cid2, out, command, self._resilience_notes(key, True))
            wait_step(out, rec["step_at_stop"] + 1, self.a.step_timeout, f"the resumed {name} to step on", after=offset)
            rec["resume_to_next_step_s"] = round(time.perf_counter() - t, 3)
            wait_step(out, steps - 1, self.a.step_timeout, f"the resumed {name} to finish", after=offset)
            wait_step(ref_out, steps - 1, self.a.step_timeout, f"the reference {name} to finish")
            rec.update(compare_steps(ref_out, out, offset, steps))
            # checkpoint-on-stop loses nothing: the resumed process starts with the step after the last one written.
            rec["lost_steps"] = (rec["restored_first_step"] or 0) - rec["step_at_stop"] - 1
        finally:
            try:
                os.killpg(ref.pid, 9)
            except ProcessLookupError:
                pass
            ref.wait()
            for c in (cid, cid2):
                self.collect_logs(c, rec)
                self.ctr.remove(c)
        if not rec["identical"] or rec["first_step"] != 0 or rec["lost_steps"] != 0:
            raise StepError(f"train: identical={rec['identical']} first_step={rec['first_step']} "
                            f"lost_steps={rec['lost_steps']} mismatches={rec['mismatches'][:3]}")

    def _resilience_serve(self, rec: dict) -> None:
        key, cid, cid2 = "resil-serve", "kyb-r-serve", "kyb-r-serve-2"
        for c in (cid, cid2):
            self.ctr.remove(c)
        clear_key(self.a.store, key)
        out = self.out_dir("r-serve")
        weights = os.path.join(out, "weights.bin")
        t = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(HERE, "server.py"), "make-weights", "--weights", weights,
                        "--mib", str(self.a.serve_weights_mib), "--backend", self.backend], check=True, timeout=600)
        rec["make_weights_s"] = round(time.perf_counter() - t, 2)
        rec["weights_bytes"] = os.path.getsize(weights)
        port = self.a.serve_port
        command = [sys.executable, "/kyb/server.py", "serve", "--weights", "/out/weights.bin", "--port", str(port),
                   "--out-dir", "/out", "--backend", self.backend]
        try:
            t = time.perf_counter()
            self.start_container(cid, out, command, self._resilience_notes(key, resume=True))
            rec["cold_answer"] = first_answer(port, self.a.ready_timeout)
            rec["cold_first_response_s"] = round(time.perf_counter() - t, 3)
            self._stop_with_checkpoint(cid, key, rec)
            rec["delete_s"] = round(self.ctr.remove(cid), 3)
            t = time.perf_counter()
            self.start_container(cid2, out, command, self._resilience_notes(key, resume=True))
            rec["restored_answer"] = first_answer(port, self.a.ready_timeout)
            rec["restored_first_response_s"] = round(time.perf_counter() - t, 3)
            rec["speedup"] = round(rec["cold_first_response_s"] / max(rec["restored_first_response_s"], 1e-6), 2)
            rec["same_answer"] = rec["cold_answer"] == rec["restored_answer"]
            rec["server_log"] = read_text(os.path.join(out, "server.log"))[-2000:]
        finally:
            for c in (cid, cid2):
                self.collect_logs(c, rec)
                self.ctr.remove(c)
            try:
                os.unlink(weights)
            except OSError:
                pass
        if not rec["same_answer"]:
            raise StepError(f"serve: the restored server answered {rec['restored_answer']!r}, the cold one "
                            f"{rec['cold_answer']!r}")

    def stop_log_lines(self, cid: str) -> list[str]:
        """The shim's checkpoint-on-stop lines for this container, from containerd's log."""
        lines = read_text(os.path.join(self.a.base, "containerd.log")).splitlines()
        return [x[-400:] for x in lines if "checkpoint-on-stop" in x and cid in x][-6:]

    def dropped_inherited(self) -> list[str]:
        """kybernate-hookd's log lines about inherited GPU files it dropped (kybernate runtime only)."""
        try:
            with open(os.path.join(self.a.base, "hookd.log"), errors="replace") as f:
                return [line.strip()[-400:] for line in f if "inherited from a CUDA process" in line][-8:]
        except OSError:
            return []

    def _incomplete_checkpoint(self, ref: str) -> str:
        """What a checkpoint image lacks ("" when complete): containerd 1.6's ctr can report success for one that
        has no CRIU checkpoint, or an entry with an empty digest (see _pair_step)."""
        kinds = {m.get("mediaType", ""): m.get("digest", "") for m in self.checkpoint_index(ref)}
        missing = [t for t in (CRIU_TAR, CKPT_CONFIG) if t not in kinds]
        empty = [t for t, d in kinds.items() if not d]
        if missing or empty:
            return f"checkpoint image {ref} is incomplete though ctr succeeded: missing {missing}, empty digests " \
                   f"{empty}"
        return ""

    def checkpoint_index(self, ref: str) -> list[dict]:
        """The manifests of a checkpoint image's index ([] if there is no such image)."""
        _, out = self.ctr.run("images", "ls", check=False)
        digest = next((p[2] for p in (ln.split() for ln in out.splitlines()[1:]) if len(p) > 2 and p[0] == ref), "")
        if not digest:
            return []
        try:
            return list(json.loads(self.ctr.run("content", "get", digest, check=False)[1]).get("manifests", []))
        except ValueError:
            return []

    def image_size(self, ref: str) -> int:
        """Bytes of a checkpoint image: its index plus every blob the index lists."""
        _, out = self.ctr.run("images", "ls", check=False)
        digest = None
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) > 2 and parts[0] == ref:
                digest = parts[2]
        if not digest:
            return -1
        rc_out = self.ctr.run("content", "get", digest, check=False)[1]
        try:
            index = json.loads(rc_out)
        except ValueError:
            return -1
        return len(rc_out) + sum(int(m.get("size", 0)) for m in index.get("manifests", []))


def disk_write_rate(directory: str, size: int) -> dict:
    """The disk's plain sequential write rate into `directory` (the store's floor): `size` bytes in 16 MiB
    writes, then fsync, through the page cache as CRIU writes."""
    path = os.path.join(directory, ".kyb-disk-floor")
    block = os.urandom(16 << 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    os.unlink(path)
    return {"bytes": size, "s": round(dt, 3), "mb_s": round(size / dt / 1e6, 1)}


def criu_log_seconds(top: str, name: str) -> float | None:
    """CRIU's own duration from its log's last timestamp `(SS.ffffff)` (seconds since it started)."""
    for path in glob.glob(os.path.join(top, "**", name), recursive=True):
        last = None
        with open(path, errors="replace") as f:
            for line in f:
                m = re.match(r"\((\d+\.\d+)\)", line)
                if m:
                    last = float(m.group(1))
        if last is not None:
            return round(last, 3)
    return None


def _newest_generation(store: str, key: str) -> str:
    numbers = [int(n) for n in os.listdir(os.path.join(store, key)) if n.isdigit()]
    return os.path.join(store, key, str(max(numbers)))


def store_generations(store: str, key: str) -> list[int]:
    """Complete generations of `key` in the store (numbered dirs with a manifest.json)."""
    try:
        names = os.listdir(os.path.join(store, key))
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isfile(os.path.join(store, key, n, "manifest.json")))


def clear_key(store: str, key: str) -> None:
    """A scenario starts from a key without generations (resume: latest must start the first container fresh)."""
    shutil.rmtree(os.path.join(store, key), ignore_errors=True)


def wait_for_status(ctr: Ctr, cid: str, wanted: tuple[str, ...], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = ctr.task_status(cid)
        if status in wanted:
            return status
        if time.monotonic() > deadline:
            raise StepError(f"{cid}: task still {status} after {timeout:.0f}s (wanted {'/'.join(wanted)})")
        time.sleep(0.1)


def first_answer(port: int, timeout: float, seed: int = 7) -> str:
    """Poll GET /infer?seed=… on 127.0.0.1:port until the server answers; its body."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/infer?seed={seed}", timeout=30) as r:
                return r.read().decode().strip()
        except OSError as e:
            if time.monotonic() > deadline:
                raise StepError(f"no answer on port {port} within {timeout:.0f}s: {e}") from e
            time.sleep(0.05)


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _steps_file(out_dir: str) -> str:
    return os.path.join(out_dir, "steps.log")


def read_steps(out_dir: str, after: int = 0) -> list[tuple[int, str]]:
    """(step, value) of every complete line of out_dir/steps.log from byte `after` on."""
    try:
        with open(_steps_file(out_dir), "rb") as f:
            f.seek(after)
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    out = []
    for line in data.split("\n")[:-1]:  # the last piece is incomplete (or empty)
        head, _, value = line.partition(" ")
        if head.startswith("step="):
            out.append((int(head[5:]), value))
    return out


def last_step(out_dir: str, after: int = 0) -> int:
    rows = read_steps(out_dir, after)
    return rows[-1][0] if rows else -1


def wait_step(out_dir: str, step: int, timeout: float, what: str, after: int = 0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = last_step(out_dir, after)
        if n >= step:
            return n
        time.sleep(0.1)
    tail = ""
    try:
        with open(os.path.join(out_dir, "stdout.log"), errors="replace") as f:
            tail = f.read()[-800:]
    except OSError:
        pass
    raise StepError(f"timeout ({timeout:.0f}s) waiting for {what}; last step {last_step(out_dir, after)}; "
                    f"output: {tail!r}")


def compare_steps(ref_dir: str, out_dir: str, restored_from: int, steps: int) -> dict:
    """Every line the container wrote must equal the reference's line for that step; the restored process
    (lines after byte `restored_from`) must have run on, in order, to the last step."""
    ref = dict(read_steps(ref_dir))
    rows = read_steps(out_dir)
    restored = read_steps(out_dir, restored_from)
    mismatches = [f"step {n}: got {v!r}, reference {ref.get(n)!r}" for n, v in rows if ref.get(n) != v]
    first = restored[0][0] if restored else None
    in_order = [n for n, _ in restored] == list(range(first, first + len(restored))) if restored else False
    covered = set(n for n, _ in rows) >= set(range(steps))
    return {"lines": len(rows), "restored_lines": len(restored), "restored_first_step": first,
            "restored_in_order": in_order, "all_steps_present": covered, "reference_lines": len(ref),
            "mismatches": mismatches[:10], "mismatch_count": len(mismatches),
            "identical": not mismatches and in_order and covered and len(ref) == steps}


def gpu_uuids(no_gpu: bool) -> list[str]:
    """The machine's GPUs in NVML index order: nvidia-smi, or with --no-gpu the fake driver's gpus.txt."""
    if no_gpu:
        path = os.path.join(os.environ.get("FAKEGPU_STATE_DIR", ""), "gpus.txt")
        text = read_text(path) if os.environ.get("FAKEGPU_STATE_DIR") else ""
        return [ln.split("\t")[0] for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("GPU-")]


def gpu_of(pid: int, proc_id: str, no_gpu: bool) -> list[str]:
    """The GPUs a process holds memory on: nvidia-smi's compute apps (host pids), or the fake driver's record."""
    if no_gpu:
        if not proc_id:  # the fake driver keys a process by its FAKEGPU_PROC
            environ = read_text(f"/proc/{pid}/environ").split("\0")
            proc_id = next((e[len("FAKEGPU_PROC="):] for e in environ if e.startswith("FAKEGPU_PROC=")), "")
        if not proc_id or not os.environ.get("FAKEGPU_STATE_DIR"):
            return []
        text = read_text(os.path.join(os.environ["FAKEGPU_STATE_DIR"], "procs", proc_id))
        found = [ln[4:] for ln in text.splitlines() if ln.startswith("gpu=")]
        if not found:  # no transition yet: the GPU it was started on
            environ = read_text(f"/proc/{pid}/environ").split("\0")
            found = [e[len("FAKEGPU_GPU="):] for e in environ if e.startswith("FAKEGPU_GPU=")]
        return found
    try:
        p = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for ln in p.stdout.splitlines():
        parts = [x.strip() for x in ln.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            found.append(parts[1])
    return sorted(found)


def hookd_lines(base: str, *needles: str) -> list[str]:
    """hookd's log lines holding any of `needles` (the last 200 KB), each cut to 600 characters."""
    try:
        with open(os.path.join(base, "hookd.log"), errors="replace") as f:
            f.seek(max(0, os.path.getsize(f.name) - 200_000))
            return [ln.strip()[:600] for ln in f if any(n in ln for n in needles)]
    except OSError:
        return []


def criu_errors(logs: list[str]) -> list[str]:
    """CRIU's error lines (`Error (`) of the copied logs, the last 20."""
    out: list[str] = []
    for path in logs:
        try:
            with open(path, errors="replace") as f:
                out += [f"{os.path.basename(path)}: {ln.strip()[:400]}" for ln in f
                        if "Error (" in ln or "err" in ln[:40]]
        except OSError:
            pass
    return out[-20:]


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 64:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _children(pid: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        out.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return sorted(out)


def _device_items(pid: int) -> list[str]:
    """/dev/nvidia* mappings and descriptors of a process (what CRIU cannot dump)."""
    items = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            items += [line.strip() for line in f if "/dev/nvidia" in line]
    except OSError:
        pass
    for fd in glob.glob(f"/proc/{pid}/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/dev/nvidia"):
            items.append(f"fd {os.path.basename(fd)} {target}")
    return items


def dir_size(d: str) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctr", default=shutil.which("ctr") or "ctr")
    p.add_argument("--address", required=True)
    p.add_argument("--namespace", default="kybgpu")
    p.add_argument("--image", default="docker.io/kybernate/gpu-skeleton:latest")
    p.add_argument("--snapshotter", default="")
    p.add_argument("--base", required=True, help="work dir: out/, logs/, tmp/ go below it")
    p.add_argument("--state", default="", help="containerd state dir (to find runc/CRIU logs)")
    p.add_argument("--runtime", choices=tuple(RUNTIME_NAMES), default="runc")
    p.add_argument("--scenario", default="driver-floor,exit-restore",
                   help=f"comma-separated, from: {', '.join(ALL_SCENARIOS)}")
    p.add_argument("--vram-gib", type=float, default=2.6)
    p.add_argument("--cycles", type=int, default=3, help="driver-floor cycles")
    p.add_argument("--gpu-index", type=int, default=0)
    p.add_argument("--remap-to", type=int, default=None)
    p.add_argument("--bind", action="append", help="extra host path to bind read-only (repeatable)")
    p.add_argument("--own-netns", action="store_true", help="own network namespace (default: --net-host)")
    p.add_argument("--no-gpu", action="store_true", help="plumbing test on a CPU machine: py backend, no driver")
    p.add_argument("--ready-timeout", type=float, default=180)
    p.add_argument("--step-timeout", type=float, default=300)
    p.add_argument("--results", default="", help="write results JSON here")
    p.add_argument("--programs", default=",".join(PROGRAMS), help=f"programs scenario: from {', '.join(PROGRAMS)}")
    p.add_argument("--program-steps", type=int, default=200, help="programs scenario: steps per program")
    p.add_argument("--program-checkpoint-at", type=int, default=30, help="programs scenario: checkpoint at this step")
    p.add_argument("--store-sizes", default="2.6,16", help="store scenario: VRAM GiB of each container checkpointed")
    p.add_argument("--store-disk-floor-gib", type=float, default=4.0, help="store scenario: bytes of the disk floor")
    p.add_argument("--hookd-metrics", default="http://127.0.0.1:9464/metrics", help="kybernate-hookd's /metrics")
    p.add_argument("--store", default=os.environ.get("KYBERNATE_STORE", "/var/lib/kybernate/store"),
                   help="resilience: the checkpoint store (hookd's and the shim's, $KYBERNATE_STORE)")
    p.add_argument("--stop-timeout", type=float, default=120, help="resilience: checkpoint-on-stop budget, seconds")
    p.add_argument("--serve-weights-mib", type=int, default=2048, help="resilience: the server's weights file size")
    p.add_argument("--serve-port", type=int, default=18080, help="resilience: the server's port (host network)")
    p.add_argument("--remap2-cuda-visible", default="0", help="remap2: the workload's CUDA_VISIBLE_DEVICES")
    p.add_argument("--ddp-settings", default=",".join(DDP_SETTINGS), help=f"ddp: from {', '.join(DDP_SETTINGS)}")
    p.add_argument("--ddp-steps", type=int, default=80, help="ddp: steps")
    p.add_argument("--ddp-pause-at", type=int, default=10, help="ddp: pause and resume at this step")
    p.add_argument("--ddp-checkpoint-at", type=int, default=30, help="ddp: checkpoint at this step")
    p.add_argument("--ddp-interval", type=float, default=0.1, help="ddp: at least this many seconds per step")
    p.add_argument("--ddp-criu", default="link-remap,tcp-established,network-lock skip,ghost-limit 256M",
                   help="ddp: CRIU options (comma-separated) in the container's org.criu.config file")
    a = p.parse_args(argv)
    a.state = a.state or os.path.join(a.base, "state")
    os.makedirs(os.path.join(a.base, "tmp"), exist_ok=True)

    results: dict = {"runtime": a.runtime, "vram_gib": a.vram_gib, "scenarios": {}, "started": time.time()}

    def save() -> None:
        if a.results:
            with open(a.results, "w") as f:
                json.dump(results, f, indent=1, default=str)

    try:
        runner = Runner(a)
    except NotWired as e:
        log(f"NOT WIRED: {e}")
        results["error"] = f"not wired: {e}"
        save()
        return 3
    runner.save = save
    results["driver"] = runner.steps.info()
    results["floor_driver"] = runner.floor.info()
    results["binds"] = runner.binds
    results["devices"] = runner.devices
    log(f"driver: {results['driver']}")
    log(f"binds: {runner.binds}  devices: {runner.devices}")
    rc = 0
    for name in [s.strip() for s in a.scenario.split(",") if s.strip()]:
        if name not in ALL_SCENARIOS:
            log(f"unknown scenario {name}")
            rc = 2
            continue
        rec: dict = {}
        results["scenarios"][name] = rec
        log(f"=== {name} ===")
        t = time.perf_counter()
        try:
            getattr(runner, "s_" + name.replace("-", "_"))(rec)
            rec["result"] = "PASS"
        except Exception as e:  # noqa: BLE001 - keep going, record why
            rec["result"] = "FAIL"
            rec["error"] = f"{type(e).__name__}: {e}"
            rc = 1
            try:
                runner.collect_logs(f"kyb-{name}", rec)
                runner.ctr.remove(f"kyb-{name}")
            except Exception:  # noqa: BLE001
                pass
        rec["scenario_wall_s"] = round(time.perf_counter() - t, 2)
        log(f"{name}: {rec['result']} {json.dumps({k: v for k, v in rec.items() if k != 'logs'}, default=str)}")
        results["commands"] = runner.ctr.commands
        save()
    results["finished"] = time.time()
    save()
    print_summary(results)
    return rc


def print_summary(results: dict) -> None:
    keys = ("gpu_lock_s", "gpu_checkpoint_s", "ctr_pause_s", "ctr_task_checkpoint_raw_s", "ctr_checkpoint_s",
            "delete_s", "export_s", "import_s", "ctr_restore_s", "ctr_resume_s", "gpu_restore_s", "gpu_unlock_s",
            "total_s", "workload_gap_s")
    print("\n==== summary (seconds) ====")
    for name, rec in results["scenarios"].items():
        if name == "store":
            print(f"store disk floor: {rec.get('disk_write')}")
            for size, r in rec.items():
                if isinstance(r, dict) and "result" in r:
                    vals = " ".join(f"{k}={r[k]}" for k in ("kybernate_checkpoint_s", "gpu_lock_s", "gpu_checkpoint_s",
                                                           "criu_dump_s", "floor_s", "ratio_to_floor", "criu_pages_bytes",
                                                           "criu_write_mb_s", "ctr_run_restore_s", "gpu_restore_s",
                                                           "workload_gap_s") if k in r)
                    print(f"{'store ' + size:24s} {r['result']:4s} {vals} verified={r.get('verified')}")
                    if r.get("error"):
                        print(f"{'':24s} error: {r['error'][:600]}")
            continue
        if name == "resilience":
            for part, r in rec.items():
                if isinstance(r, dict):
                    vals = " ".join(f"{k}={r[k]}" for k in ("stop_s", "generation_bytes", "step_at_stop",
                                                           "restored_first_step", "lost_steps", "identical",
                                                           "cold_first_response_s", "restored_first_response_s",
                                                           "speedup", "same_answer") if k in r)
                    print(f"{'resilience ' + part:24s} {r.get('result', '?'):4s} {vals}")
                    if r.get("error"):
                        print(f"{'':24s} error: {r['error'][:600]}")
            continue
        if name == "pair":
            for mode in ("gpu0", "gpu1", "both"):
                for step, r in (rec.get(mode) or {}).items():
                    own = " ".join(f"{k}={v['s']}" for k, v in r.items() if isinstance(v, dict) and "s" in v)
                    print(f"{'pair ' + mode + ' ' + step:24s} wall={r.get('wall_s')} {own} "
                          f"gpu_ckpt={r.get('gpu_checkpoint_s')} gpu_restore={r.get('gpu_restore_s')}")
            print(f"{'pair':24s} {rec.get('result', '?')} {rec.get('error', '')[:600]}")
            continue
        if name == "programs":
            for prog, r in rec.items():
                if isinstance(r, dict):
                    vals = " ".join(f"{k}={r[k]}" for k in ("ready_s", "ctr_checkpoint_s", "ctr_restore_s",
                                                           "step_at_checkpoint", "restored_first_step", "lines",
                                                           "mismatch_count") if k in r)
                    print(f"{'program ' + prog:24s} {r.get('result', '?'):4s} {vals} identical={r.get('identical')} "
                          f"dropped_inherited={len(r.get('dropped_inherited') or [])}")
                    if r.get("error"):
                        print(f"{'':24s} error: {r['error'][:600]}")
            continue
        rows = rec.get("cycles") or [rec]
        for i, r in enumerate(rows):
            vals = " ".join(f"{k.replace('_s', '')}={r[k]}" for k in keys if k in r)
            tag = f"{name}[{i}]" if "cycles" in rec else name
            print(f"{tag:18s} {rec.get('result', '?'):4s} {vals} verified={r.get('verified')}")
        if rec.get("error"):
            print(f"{'':18s} error: {rec['error'][:600]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
