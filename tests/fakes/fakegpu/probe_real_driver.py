"""Ask the REAL CUDA driver the questions the fake driver answers, so the fake stays honest.

Run as root on a GPU machine with torch (the H100 test machine): it starts a small torch process that
holds VRAM, then walks it through every checkpoint transition, the wrong ones included, and prints
one line per call: `call=... pid=... rc=<CUresult> name=<CUDA_ERROR_...> state_after=... ms=...`.
Optionally exercises the cuda-checkpoint binary too (`--cuda-checkpoint PATH`).

This is a measuring tool for people, not a test: CI never runs it. Results go into FACTS/README.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time

STATES = {0: "RUNNING", 1: "LOCKED", 2: "CHECKPOINTED", 3: "FAILED", 4: "CHECKPOINTING", 5: "RESTORING"}
CODES = [1, 2, 3, 4, 100, 101, 304, 400, 401, 500, 800, 801, 909, 999]

WORKLOAD = r"""
import sys, time, torch
x = torch.ones(int(float(sys.argv[1]) * (1 << 30)) // 4, device="cuda")
print("ready", flush=True)
while True:
    x += 1
    torch.cuda.synchronize()
    time.sleep(0.05)
"""


class LockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint32), ("reserved0", ctypes.c_uint32), ("reserved1", ctypes.c_uint64 * 7)]


class Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class Pair(ctypes.Structure):
    _fields_ = [("old", Uuid), ("new", Uuid)]


class RestoreArgs(ctypes.Structure):
    _fields_ = [("pairs", ctypes.POINTER(Pair)), ("count", ctypes.c_uint32),
                ("reserved", ctypes.c_char * 44), ("reserved1", ctypes.c_uint64)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--libcuda", default="libcuda.so.1")
    ap.add_argument("--cuda-checkpoint", default="")
    ap.add_argument("--vram-gib", type=float, default=1.0)
    ap.add_argument("--oom", action="store_true", help="also provoke a restore without free VRAM (kills the workload)")
    args = ap.parse_args()

    lib = ctypes.CDLL(args.libcuda)
    name_p = ctypes.c_char_p()
    str_p = ctypes.c_char_p()

    def name(rc: int) -> str:
        lib.cuGetErrorName(rc, ctypes.byref(name_p))
        return (name_p.value or b"?").decode()

    def text(rc: int) -> str:
        lib.cuGetErrorString(rc, ctypes.byref(str_p))
        return (str_p.value or b"?").decode()

    print("cuInit", lib.cuInit(0))
    ver = ctypes.c_int()
    lib.cuDriverGetVersion(ctypes.byref(ver))
    print("driver_version", ver.value)
    for code in CODES:
        print(f"code={code} name={name(code)} string={text(code)!r}")

    def state(pid: int) -> str:
        st = ctypes.c_int(-1)
        rc = lib.cuCheckpointProcessGetState(pid, ctypes.byref(st))
        return STATES.get(st.value, str(st.value)) if rc == 0 else f"err:{name(rc)}"

    def call(fn: str, pid: int, arg: object = None) -> int:
        t = time.perf_counter()
        rc = getattr(lib, fn)(pid, arg)
        ms = (time.perf_counter() - t) * 1000
        print(f"call={fn} pid={pid} rc={rc} name={name(rc)} state_after={state(pid)} ms={ms:.1f}", flush=True)
        return int(rc)

    def tid(pid: int) -> None:
        out = ctypes.c_int(0)
        rc = lib.cuCheckpointProcessGetRestoreThreadId(pid, ctypes.byref(out))
        print(f"call=GetRestoreThreadId pid={pid} rc={rc} name={name(rc)} tid={out.value}")

    def lock(pid: int, ms: int) -> int:
        la = LockArgs(timeoutMs=ms)
        return call("cuCheckpointProcessLock", pid, ctypes.byref(la))

    def restore(pid: int, pairs: list[tuple[bytes, bytes]] | None = None) -> int:
        if not pairs:
            return call("cuCheckpointProcessRestore", pid, None)
        arr = (Pair * len(pairs))()
        for i, (old, new) in enumerate(pairs):
            arr[i].old.bytes[:] = old
            arr[i].new.bytes[:] = new
        ra = RestoreArgs(pairs=ctypes.cast(arr, ctypes.POINTER(Pair)), count=len(pairs))
        return call("cuCheckpointProcessRestore", pid, ctypes.byref(ra))

    def smi() -> None:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                             capture_output=True, text=True)
        print("nvidia-smi compute-apps:", out.stdout.strip().replace("\n", " | ") or "(none)")
        out = subprocess.run(["nvidia-smi", "--query-gpu=uuid,name,memory.used,memory.free", "--format=csv,noheader"],
                             capture_output=True, text=True)
        print("nvidia-smi gpus:", out.stdout.strip().replace("\n", " | "))

    dev_uuid = Uuid()
    dev = ctypes.c_int()
    lib.cuDeviceGet(ctypes.byref(dev), 0)
    lib.cuDeviceGetUuid_v2(ctypes.byref(dev_uuid), dev)
    gpu0 = bytes(dev_uuid.bytes)
    print("gpu0 uuid bytes", gpu0.hex())

    # Not CUDA processes: a sleep, a pid that does not exist, ourselves (cuInit done, no context).
    sleeper = subprocess.Popen(["sleep", "600"])
    for pid, what in ((sleeper.pid, "sleep"), (4194000, "no-such-pid"), (os.getpid(), "self")):
        print(f"--- {what}: get_state={state(pid)}")
        tid(pid)
        lock(pid, 500)
        call("cuCheckpointProcessCheckpoint", pid)
        call("cuCheckpointProcessUnlock", pid)

    work = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(args.vram_gib)], stdout=subprocess.PIPE, text=True)
    assert work.stdout is not None
    print("workload:", work.stdout.readline().strip(), "pid", work.pid)
    pid = work.pid
    smi()
    print("--- wrong transitions from RUNNING")
    tid(pid)
    call("cuCheckpointProcessCheckpoint", pid)
    restore(pid)
    call("cuCheckpointProcessUnlock", pid)
    print("--- LOCKED")
    lock(pid, 0)
    lock(pid, 500)
    restore(pid)
    smi()
    call("cuCheckpointProcessCheckpoint", pid)
    print("--- CHECKPOINTED")
    smi()
    tid(pid)
    call("cuCheckpointProcessCheckpoint", pid)
    lock(pid, 500)
    call("cuCheckpointProcessUnlock", pid)
    restore(pid, [(os.urandom(16), gpu0)])  # pairs that miss the checkpointed GPU
    restore(pid, [(gpu0, os.urandom(16))])  # unknown target
    restore(pid, [(gpu0, gpu0)])  # identity pair
    print("--- LOCKED after restore")
    smi()
    call("cuCheckpointProcessUnlock", pid)

    if args.cuda_checkpoint:
        cli(args.cuda_checkpoint, pid, sleeper.pid)

    print("--- lock a stopped (SIGSTOP) process, 1000 ms timeout; SIGCONT after 5 s")
    stalled_lock(lock, state, pid, stop=lambda: os.kill(pid, signal.SIGSTOP), cont=lambda: os.kill(pid, signal.SIGCONT))
    if state(pid) == "LOCKED":
        call("cuCheckpointProcessUnlock", pid)
    print("--- lock a frozen cgroup, 1000 ms timeout; thaw after 5 s")
    box: list[str] = []
    stalled_lock(lock, state, pid, stop=lambda: box.append(freeze_cgroup(pid)), cont=lambda: thaw_cgroup(box[0]) if box and box[0] else None)
    if state(pid) == "LOCKED":
        call("cuCheckpointProcessUnlock", pid)

    if args.oom:
        print("--- restore without free VRAM")
        lock(pid, 0)
        call("cuCheckpointProcessCheckpoint", pid)
        filler = subprocess.Popen(
            [sys.executable, "-c",
             "import torch,time; f,t=torch.cuda.mem_get_info(); x=torch.empty(int(f-(256<<20)),dtype=torch.uint8,device='cuda'); "
             "print('filled',flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
        assert filler.stdout is not None
        print("filler:", filler.stdout.readline().strip())
        smi()
        restore(pid)
        filler.kill()
        filler.wait()
        time.sleep(1)
        smi()
        restore(pid)
        call("cuCheckpointProcessUnlock", pid)

    work.kill()
    sleeper.kill()
    return 0


def stalled_lock(lock, state, pid: int, stop, cont) -> None:  # type: ignore[no-untyped-def]
    import threading

    result: list[int] = []
    stop()
    time.sleep(0.3)
    got: list[str] = []
    probe = threading.Thread(target=lambda: got.append(state(pid)), daemon=True)
    probe.start()
    probe.join(3)
    print(f"get_state while stopped/frozen: {got or 'no answer within 3 s'}", flush=True)
    t0 = time.perf_counter()
    th = threading.Thread(target=lambda: result.append(lock(pid, 1000)), daemon=True)
    th.start()
    th.join(5)
    print(f"after 5 s: lock returned={bool(result)} rc={result[:1]} elapsed={time.perf_counter() - t0:.2f}s", flush=True)
    cont()
    th.join(10)
    print(f"after resume: lock returned={bool(result)} rc={result[:1]} elapsed={time.perf_counter() - t0:.2f}s "
          f"state={state(pid)}", flush=True)


def freeze_cgroup(pid: int) -> str:
    try:
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            cg = "/sys/fs/cgroup/kyb-probe"
            os.makedirs(cg, exist_ok=True)
            open(f"{cg}/cgroup.procs", "w").write(str(pid))
            open(f"{cg}/cgroup.freeze", "w").write("1")
        else:
            cg = "/sys/fs/cgroup/freezer/kyb-probe"
            os.makedirs(cg, exist_ok=True)
            open(f"{cg}/cgroup.procs", "w").write(str(pid))
            open(f"{cg}/freezer.state", "w").write("FROZEN")
        time.sleep(0.3)
        print("frozen in", cg)
        return cg
    except OSError as err:
        print("cannot freeze:", err)
        return ""


def thaw_cgroup(cg: str) -> None:
    if cg.startswith("/sys/fs/cgroup/freezer"):
        open(f"{cg}/freezer.state", "w").write("THAWED")
    else:
        open(f"{cg}/cgroup.freeze", "w").write("0")


def cli(path: str, pid: int, other: int) -> None:
    def run(*argv: str) -> None:
        t = time.perf_counter()
        out = subprocess.run([path, *argv], capture_output=True, text=True)
        ms = (time.perf_counter() - t) * 1000
        print(f"cli {' '.join(argv)} -> rc={out.returncode} ms={ms:.0f} stdout={out.stdout!r} stderr={out.stderr!r}")

    run("--help")
    run("--get-state", "--pid", str(pid))
    run("--get-state", "--pid", str(other))
    run("--get-state", "--pid", "4194000")
    run("--action", "checkpoint", "--pid", str(pid))
    run("--action", "lock", "--pid", str(pid), "--timeout", "500")
    run("--get-state", "--pid", str(pid))
    run("--action", "lock", "--pid", str(pid), "--timeout", "500")
    run("--action", "checkpoint", "--pid", str(pid))
    run("--get-state", "--pid", str(pid))
    run("--get-restore-tid", "--pid", str(pid))
    run("--action", "restore", "--pid", str(pid), "--device-map", "GPU-00000000-0000-0000-0000-000000000001=GPU-00000000-0000-0000-0000-000000000002")
    run("--action", "restore", "--pid", str(pid))
    run("--action", "unlock", "--pid", str(pid))
    run("--get-state", "--pid", str(pid))


if __name__ == "__main__":
    sys.exit(main())
