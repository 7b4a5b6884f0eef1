"""kybernate-hookd against the REAL driver and NVML: the unit tests' scenarios, on a GPU machine.

Keeps the fake honest from the other side: what passes on fakegpu must pass here. Run as root on the
H100 machine with torch, kybernate importable (PYTHONPATH) and grpcio/protobuf/nvidia-ml-py present:

    python3 real_driver_hookd.py --libcuda /usr/local/nvidia/lib64/libcuda.so.1 [--cuda-checkpoint PATH]

Prints one `check=<name> ok=<bool> ...` line per check and exits non-zero if one failed. Not run by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from kybernate.hooks.api import logs
from kybernate.hooks.api.client import HookdClient, HookdError
from kybernate.hooks.hookd.daemon import Daemon
from kybernate.hooks.hookd.settings import DriverSettings, ServerSettings, Settings

# Fills N GiB with a known pattern and keeps touching it; writes `<tick> <ok>` to a file twice a second.
WORKLOAD = r"""
import os, sys, time, torch
n = int(float(sys.argv[1]) * (1 << 30)) // 8
x = torch.arange(n, dtype=torch.int64, device="cuda")
want = int(x.sum().item())
i = 0
while True:
    x += 1; x -= 1
    ok = int(x.sum().item()) == want
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(f"{i} {ok}")
    os.replace(sys.argv[2] + ".tmp", sys.argv[2])
    i += 1
    time.sleep(0.5)
"""

results: list[bool] = []


def check(name: str, ok: bool, **info: object) -> None:
    results.append(ok)
    extra = " ".join(f"{k}={v}" for k, v in info.items())
    print(f"check={name} ok={ok} {extra}", flush=True)


def tick(path: Path, after: int = -1, timeout_s: float = 30) -> tuple[int, bool]:
    """The workload's latest (tick, checksum ok), waiting for a tick newer than `after`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            i, ok = path.read_text().split()
            if int(i) > after:
                return int(i), ok == "True"
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return after, False


async def scenario(settings: Settings, gib: float) -> None:
    status_dir = Path(tempfile.mkdtemp(prefix="hookd-work-"))
    files = [status_dir / f"w{i}" for i in range(2)]
    work = [subprocess.Popen([sys.executable, "-c", WORKLOAD, str(gib), str(f)]) for f in files]
    sleeper = subprocess.Popen(["sleep", "600"])
    for w, f in zip(work, files):
        check("workload-started", tick(f, timeout_s=120)[1], pid=w.pid)
    pids = [w.pid for w in work] + [sleeper.pid]
    daemon = Daemon(settings)
    await daemon.start()
    try:
        async with HookdClient(settings.server.socket) as client:
            health = await client.health()
            check("health", health.nvml and bool(health.gpus), driver=health.driver_version, cuda=health.cuda_version,
                  backend=health.backend, gpus=",".join(f"{g.uuid}:{g.name}" for g in health.gpus))
            t = time.monotonic()
            detail = await client.checkpoint_gpu_detailed("test", "c1", pids, lock_timeout_ms=10_000, deadline_s=120)
            m = detail.manifest
            check("checkpoint", len(m.processes) == 2 and m.vram_bytes > 2 * gib * (1 << 30),
                  s=round(time.monotonic() - t, 3), vram_gib=round(m.vram_bytes / (1 << 30), 2),
                  gpus=",".join(g.uuid for g in m.gpus),
                  steps=";".join(f"{o.pid}:" + ",".join(f"{s.step}={s.seconds:.3f}" for s in o.steps)
                                 for o in detail.processes))
            smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.split()
            check("vram-released", not any(str(p) in smi for p in pids), listed=",".join(smi) or "-")
            status = await client.status("test", "c1", pids)
            check("status", [s.state for s in status] == ["CHECKPOINTED", "CHECKPOINTED"],
                  states=",".join(f"{s.pid}:{s.state}" for s in status))
            again = await client.checkpoint_gpu_detailed("test", "c1", pids, deadline_s=60)
            check("idempotent", all(not o.steps for o in again.processes) and again.manifest.gpus == m.gpus)
            t = time.monotonic()
            r = await client.restore_gpu("test", "c1", pids, manifest=m.to_dict(), deadline_s=120)
            check("restore", [o.state_after for o in r.processes] == ["RUNNING", "RUNNING"] and not r.remapped,
                  s=round(time.monotonic() - t, 3), pairs=",".join(f"{p.old_uuid}={p.new_uuid}" for p in r.pairs))
            before = [tick(f)[0] for f in files]
            ticks = [tick(f, after=b) for f, b in zip(files, before)]
            check("workloads-intact", all(ok for _, ok in ticks), ticks=ticks)

            # A frozen container: refused at once, no driver call (it would block until the thaw).
            cg = Path("/sys/fs/cgroup/kyb-hookd-check")
            cg.mkdir(exist_ok=True)
            (cg / "cgroup.procs").write_text(str(work[0].pid))
            (cg / "cgroup.freeze").write_text("1")
            time.sleep(0.3)
            t = time.monotonic()
            try:
                await client.checkpoint_gpu("test", "c1", pids, deadline_s=30)
                check("frozen-refused", False)
            except HookdError as err:
                check("frozen-refused", err.code == 9 and time.monotonic() - t < 2, code=err.code_name,
                      msg=err.message[:120].replace(" ", "_"))
            (cg / "cgroup.freeze").write_text("0")
            Path("/sys/fs/cgroup/cgroup.procs").write_text(str(work[0].pid))
            cg.rmdir()

            # Not enough free VRAM for the restore: refused before the driver could strand the process.
            m = await client.checkpoint_gpu("test", "c1", pids, deadline_s=120)
            filler = subprocess.Popen(
                [sys.executable, "-c", "import torch,time; f,_=torch.cuda.mem_get_info(); "
                 "x=torch.empty(int(f-(512<<20)),dtype=torch.uint8,device='cuda'); print('filled',flush=True); time.sleep(600)"],
                stdout=subprocess.PIPE, text=True)
            assert filler.stdout is not None
            filler.stdout.readline()
            try:
                await client.restore_gpu("test", "c1", pids, manifest=m, deadline_s=120)
                check("vram-precheck", False)
            except HookdError as err:
                check("vram-precheck", err.code == 9 and "needs" in err.message, msg=err.message[:160].replace(" ", "_"))
            filler.kill()
            filler.wait()
            time.sleep(1.0)
            r = await client.restore_gpu("test", "c1", pids, manifest=m, deadline_s=120)
            before = [tick(f)[0] for f in files]
            ticks = [tick(f, after=b) for f, b in zip(files, before)]
            check("restore-after-precheck", all(o.state_after == "RUNNING" for o in r.processes)
                  and all(ok for _, ok in ticks), ticks=ticks)
    finally:
        code = await daemon.stop()
        check("stop", code == 0)
        for p in (*work, sleeper):
            p.kill()
            p.wait()
    print(daemon.metrics.render(), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--libcuda", default="libcuda.so.1")
    ap.add_argument("--cuda-checkpoint", default="")
    ap.add_argument("--vram-gib", type=float, default=2.0)
    args = ap.parse_args()
    logs.setup("info")
    run_dir = tempfile.mkdtemp(prefix="hookd-")
    base = Settings(server=ServerSettings(socket=os.path.join(run_dir, "hookd.sock"), metrics_address="127.0.0.1:0"),
                    driver=DriverSettings(libcuda=args.libcuda))
    print("=== backend ctypes", flush=True)
    asyncio.run(scenario(base, args.vram_gib))
    if args.cuda_checkpoint:
        print("=== backend binary", flush=True)
        asyncio.run(scenario(replace(base, driver=replace(base.driver, backend="binary",
                                                          cuda_checkpoint=args.cuda_checkpoint)), args.vram_gib))
    print(f"summary: {sum(results)}/{len(results)} checks ok", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
