"""Forked workers of a CUDA process are checkpointed and restored: their inherited GPU files are dropped.

Real containerd (1.6.20 and 2.1.9), runc, CRIU and kybernate-hookd; the CUDA driver is the named fake.
The container runs `fakegpu-forker` (tests/fakes/fakegpu/forker.c): it opens /dev/nvidiactl and
/dev/nvidia0 O_CLOEXEC and maps /dev/nvidia0 MAP_SHARED ("CUDA init"), then forks two workers that
keep appending "k checksum(k)" lines, like DataLoader workers forked after CUDA init. The fake driver
answers "not a CUDA process" for the workers, as the real one does. hookd must drop the workers'
inherited /dev/nvidia* mapping and descriptors (ptrace) during the GPU checkpoint, and the workers must
run on, before the dump and after the restore.

What the CPU fake cannot reproduce: /dev/nvidia0 here is a regular file bind-mounted over /dev, not
NVIDIA's character device, so CRIU would dump the workers even if nothing were dropped (the real
failure, "Can't handle non-regular mapping", needs the real device); and the fake driver's checkpoint
does not close the parent's own device files as the real driver's does (the parent's regular-file
mapping is dumped and restored by CRIU here). The test therefore asserts the drop itself (the workers'
maps and fds, hookd's record of it) and that the workers compute on, not CRIU's refusal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RUNTIME
from harness.containerd import Containerd
from harness.containerd_api import ContainerdApi, criu_checkpoint
from harness.images import BUSYBOX_IMAGE
from harness.workload import task_pid, task_status, wait_for
from test_gpu_steps import GpuNode, fakegpu

from kybernate.hooks.api import procfs

pytestmark = pytest.mark.stack
MASK = (1 << 64) - 1


@pytest.fixture
def gpu(tmp_path: Path) -> Iterator[GpuNode]:
    node = GpuNode(tmp_path)
    try:
        yield node
    finally:
        node.stop()


def checksum(k: int) -> int:
    """forker.c's checksum()."""
    h = 1469598103934665603
    for i in range(k % 1000 + 1):
        h = ((h ^ (k + i)) * 1099511628211) & MASK
    return h


def run_forker(c: Containerd, gpu: GpuNode, tmp: Path, name: str) -> None:
    devdir = tmp / "dev"
    devdir.mkdir(exist_ok=True)
    for f in ("nvidia0", "nvidiactl"):
        (devdir / f).write_bytes(b"\0" * 8192)
    forker = fakegpu.build(Path("/tmp/kybernate-fakegpu")).forker
    mounts = [f"type=bind,src={devdir / 'nvidia0'},dst=/dev/nvidia0,options=rbind:rw",
              f"type=bind,src={devdir / 'nvidiactl'},dst=/dev/nvidiactl,options=rbind:rw",
              f"type=bind,src={forker},dst=/fakegpu-forker,options=rbind:ro"]
    c.ctr("run", "-d", "--runtime", RUNTIME, *gpu.container_env(f"p-{name}"),
          *[arg for m in mounts for arg in ("--mount", m)], BUSYBOX_IMAGE, name, "/fakegpu-forker", "2")


def lines(c: Containerd, name: str, file: str) -> list[str]:
    out = c.ctr("tasks", "exec", "--exec-id", f"cat-{file}-{os.urandom(3).hex()}", name, "cat", f"/{file}",
                check=False).stdout
    return [line for line in out.splitlines() if line.strip()]


def check_worker(c: Containerd, name: str, worker: int, skip: int = 0) -> int:
    """The worker's lines (after the first `skip`) count up by one, each with the right checksum, from 0
    (or, after `skip`, from wherever the restored worker went on); returns how many lines there are."""
    rows = [row.split() for row in lines(c, name, f"w{worker}")]
    rows = [r for r in rows if len(r) == 2]
    tail = rows[skip:]
    first = int(tail[0][0]) if skip and tail else 0
    assert [int(k) for k, _ in tail] == list(range(first, first + len(tail))), f"worker {worker}: a step skipped"
    assert all(int(v) == checksum(int(k)) for k, v in rows), f"worker {worker} wrote a wrong checksum"
    return len(rows)


def workers_of(pid: int) -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and procfs.parent(int(p)) == pid)


def device_items(pid: int) -> list[str]:
    maps = [m.text for m in procfs.maps(pid) if m.path.startswith("/dev/nvidia")]
    return maps + [f"fd {fd} {p}" for fd, p in procfs.open_fds(pid).items() if p.startswith("/dev/nvidia")]


def dropped_pids(gpu: GpuNode) -> set[int]:
    text = gpu.log.read_text()
    return {int(m) for m in re.findall(r"dropped GPU device files inherited.* pid=(\d+)", text)}


def wait_workers_go_on(c: Containerd, name: str) -> None:
    counts = [check_worker(c, name, w) for w in (0, 1)]
    wait_for("both workers to write more", lambda: all(check_worker(c, name, w) > n + 2
                                                       for w, n in zip((0, 1), counts)), 20)


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_checkpoint_exit_drops_inherited_gpu_files_and_restored_workers_run_on(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_forker(c, gpu, tmp_path, "fork")
    parent = task_pid(c, "fork")
    workers = wait_for("two workers", lambda: w if len(w := workers_of(parent)) == 2 else None)
    wait_for("the workers to write", lambda: all(check_worker(c, "fork", w) > 2 for w in (0, 1)))
    for w in workers:  # inherited from the "CUDA" parent: the mapping and both descriptors
        items = device_items(w)
        assert any("rw-s /dev/nvidia0" in i for i in items) and any("/dev/nvidiactl" in i for i in items), items

    with ContainerdApi(c.address, c.namespace) as api:
        descriptors = api.checkpoint_task("fork", exit=True)
        assert task_status(c, "fork") == "STOPPED"
        assert dropped_pids(gpu) == set(workers)
        c.ctr("tasks", "delete", "fork")
        api.create_task_from_checkpoint("fork", criu_checkpoint(descriptors))
        new_parent = api.start_task("fork")

    ops = [(e.op, e.pid) for e in gpu.events("p-fork")]
    assert ops == [("lock", parent), ("checkpoint", parent), ("restore", new_parent), ("unlock", new_parent)]
    new_workers = wait_for("the restored workers", lambda: w if len(w := workers_of(new_parent)) == 2 else None)
    assert all(device_items(w) == [] for w in new_workers)  # restored without what they never used
    assert any("/dev/nvidia0" in i for i in device_items(new_parent))  # the fake parent keeps its own
    wait_workers_go_on(c, "fork")


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_checkpoint_leave_running_drops_inherited_gpu_files_and_workers_run_on(
        kyb_factory, gpu: GpuNode, tmp_path: Path, version: str) -> None:
    c = kyb_factory(version, runtime_toml=gpu.runtime_toml())
    run_forker(c, gpu, tmp_path, "live")
    parent = task_pid(c, "live")
    workers = wait_for("two workers", lambda: w if len(w := workers_of(parent)) == 2 else None)
    wait_for("the workers to write", lambda: all(check_worker(c, "live", w) > 2 for w in (0, 1)))

    with ContainerdApi(c.address, c.namespace) as api:  # its lease keeps the checkpoint until it closes
        descriptors = api.checkpoint_task("live", exit=False)
        assert task_status(c, "live") == "RUNNING"
        assert dropped_pids(gpu) == set(workers)
        assert workers_of(parent) == workers and all(device_items(w) == [] for w in workers)
        assert gpu.node.state("p-live").get("state") == "RUNNING"
        wait_workers_go_on(c, "live")

        # The image taken while it kept running restores too. The rootfs keeps the lines written after
        # the checkpoint; the restored workers go on from their checkpointed step, appending after them.
        files = [open(f"/proc/{parent}/root/w{w}") for w in (0, 1)]  # readable after the kill
        c.ctr("tasks", "kill", "-s", "SIGKILL", "live")
        wait_for("the task to stop", lambda: task_status(c, "live") == "STOPPED")
        c.ctr("tasks", "delete", "live")
        written = []
        for f in files:
            written.append(len([line for line in f.read().splitlines() if line.strip()]))
            f.close()
        api.create_task_from_checkpoint("live", criu_checkpoint(descriptors))
        new_parent = api.start_task("live")
    new_workers = wait_for("the restored workers", lambda: w if len(w := workers_of(new_parent)) == 2 else None)
    assert all(device_items(w) == [] for w in new_workers)
    wait_for("both restored workers to write", lambda: all(check_worker(c, "live", w, skip=n) > n + 3
                                                         for w, n in zip((0, 1), written)), 20)
