"""Hibernate and wake through our shim (standby's disk tier, shim/hibernate.py) on the real stack: containerd
1.6.20 and 2.1.9, runc, CRIU, CNI.

The task's processes are dumped and gone while containerd (and CRI) keep seeing it RUNNING with its pid; no
exit event reaches containerd (`ctr events` watches); a `ctr run` waiting on the task keeps waiting and keeps
receiving the container's output after the wake; the counter continues where it was.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RUNTIME, processes
from harness.containerd import Containerd, CtrError
from harness.images import BUSYBOX_IMAGE
from harness.workload import read_counts, task_status, wait_for

from kybernate.hooks.containerd.client import ContainerdClient, container_spec
from kybernate.hooks.containerd.shim import ShimCallFailed, shim_addresses, shim_hibernate, shim_wake

pytestmark = pytest.mark.stack

# A counter in /count and on stdout.
TALKER = "i=0; while true; do echo $i >> /count; echo out$i; i=$((i+1)); sleep 0.2; done"


class Lines:
    """The lines a subprocess writes on stdout, collected by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def ctr_events(kyb: Containerd) -> Iterator[Lines]:
    """`ctr events`: every event containerd publishes, of every namespace."""
    proc = subprocess.Popen([str(kyb.binaries.ctr), "--address", str(kyb.address), "events"], stdout=subprocess.PIPE,
                            text=True, env=kyb.env)
    lines = Lines(proc)
    try:
        yield lines
    finally:
        lines.stop()


def seen(events: Lines, topic: str, container_id: str) -> list[str]:
    """The task's own events of that topic (not its exec'd processes': read_counts execs `cat`)."""
    import re

    exec_id = re.compile(r'"id":"([^"]*)"')
    return [line for line in events.lines if f" {topic} " in line and f'"container_id":"{container_id}"' in line
            and all(i == container_id for i in exec_id.findall(line))]


def addresses(c: Containerd, namespace: str, container_id: str) -> list[str]:
    with ContainerdClient(c.address, namespace) as api:
        spec = container_spec(api.get_container(container_id))
    return shim_addresses(str(c.address), namespace, spec, container_id)


def hibernate(c: Containerd, namespace: str, container_id: str, image: Path) -> int:
    image.mkdir()
    reply = asyncio.run(shim_hibernate(addresses(c, namespace, container_id), namespace, container_id, str(image),
                                       timeout=120))
    return reply.pid


def wake(c: Containerd, namespace: str, container_id: str, image: Path) -> int:
    reply = asyncio.run(shim_wake(addresses(c, namespace, container_id), namespace, container_id, str(image),
                                  timeout=60))
    return reply.pid


def task_pid(c: Containerd, container_id: str) -> int:
    with ContainerdClient(c.address, c.namespace) as api:
        return api.get_task(container_id).pid


def counts(c: Containerd, name: str) -> list[int]:
    try:
        return read_counts(c, name)
    except CtrError:
        return []


def run_attached(c: Containerd, name: str) -> Lines:
    """`ctr run` in the foreground: it waits on the task (Tasks.Wait) and copies its stdout until it exits."""
    cmd = [str(c.binaries.ctr), "--address", str(c.address), "-n", c.namespace, "run", "--fifo-dir",
           str(c.dir / "fifo"), "--runtime", RUNTIME, BUSYBOX_IMAGE, name, "sh", "-c", TALKER]
    return Lines(subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=c.env))


def test_hibernate_and_wake_keep_containerds_view_and_the_counter(kyb: Containerd, ctr_events: Lines,
                                                                   tmp_path: Path) -> None:
    name = "hib"
    run = run_attached(kyb, name)
    before = wait_for("the counter", lambda: (n := counts(kyb, name)) and len(n) > 3 and n)[-1]
    pid = task_pid(kyb, name)

    assert hibernate(kyb, kyb.namespace, name, tmp_path / "img") == pid
    assert (tmp_path / "img" / "inventory.img").exists()
    assert pid not in processes()  # the processes are gone...
    assert task_status(kyb, name) == "RUNNING" and task_pid(kyb, name) == pid  # ...containerd sees it running
    assert run.proc.poll() is None  # ctr's Wait did not return
    r = kyb.ctr("tasks", "exec", "--exec-id", "x", name, "true", check=False)
    assert r.returncode != 0 and "hibernated" in r.stderr
    r = kyb.ctr("tasks", "pause", name, check=False)
    assert r.returncode != 0 and "wake it first" in r.stderr
    printed = len(run.lines)

    new_pid = wake(kyb, kyb.namespace, name, tmp_path / "img")
    assert new_pid in processes() and task_status(kyb, name) == "RUNNING" and task_pid(kyb, name) == new_pid
    after = wait_for("the restored counter to move on", lambda: (n := counts(kyb, name)) and n[-1] > before + 3 and n)
    assert after == list(range(len(after)))  # one unbroken run: restored, not started afresh
    # The container's stdout still reaches the `ctr run` that started it.
    wait_for("output after the wake", lambda: len(run.lines) > printed + 3)
    assert run.lines[-1].startswith("out") and int(run.lines[-1][3:]) > before
    # containerd saw the task's create and start once and no exit so far.
    assert not seen(ctr_events, "/tasks/exit", name) and not seen(ctr_events, "/tasks/delete", name)
    assert len(seen(ctr_events, "/tasks/create", name)) == 1 and len(seen(ctr_events, "/tasks/start", name)) == 1

    kyb.ctr("tasks", "kill", "-s", "SIGKILL", name)
    assert run.proc.wait(30) == 137
    wait_for("the exit event", lambda: seen(ctr_events, "/tasks/exit", name))
    run.stop()


def test_a_hibernated_task_stops_cleanly_without_a_wake(kyb: Containerd, ctr_events: Lines, tmp_path: Path) -> None:
    name = "hibstop"
    run = run_attached(kyb, name)
    wait_for("the counter", lambda: len(counts(kyb, name)) > 2)
    pid = hibernate(kyb, kyb.namespace, name, tmp_path / "img")

    kyb.ctr("tasks", "kill", name)  # SIGTERM: no process to receive it; the task ends as it would have
    assert run.proc.wait(30) == 143
    wait_for("the exit event", lambda: seen(ctr_events, "/tasks/exit", name))
    exits = seen(ctr_events, "/tasks/exit", name)
    assert len(exits) == 1 and f'"pid":{pid}' in exits[0].replace(" ", "") and '"exit_status":143' in exits[0]
    wait_for("containerd's delete after ctr run", lambda: seen(ctr_events, "/tasks/delete", name))
    assert name not in kyb.ctr("tasks", "ls").stdout
    kyb.ctr("containers", "rm", name)
    run.stop()


def test_a_failed_hibernate_leaves_the_task_running(kyb: Containerd, ctr_events: Lines, tmp_path: Path) -> None:
    name = "hibfail"
    run = run_attached(kyb, name)
    before = wait_for("the counter", lambda: (n := counts(kyb, name)) and len(n) > 2 and n)[-1]
    pid = task_pid(kyb, name)
    image = tmp_path / "ro"
    image.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(image)], check=True)
    try:
        with pytest.raises(ShimCallFailed) as failed:
            asyncio.run(shim_hibernate(addresses(kyb, kyb.namespace, name), kyb.namespace, name, str(image),
                                       timeout=120))
    finally:
        subprocess.run(["umount", str(image)], check=True)
    assert "criu" in failed.value.message.lower() or "dump" in failed.value.message.lower()
    assert pid in processes() and task_status(kyb, name) == "RUNNING" and task_pid(kyb, name) == pid
    wait_for("the counter to go on", lambda: (n := counts(kyb, name)) and n[-1] > before + 3)
    assert run.proc.poll() is None and not seen(ctr_events, "/tasks/exit", name)
    # Nothing hibernated: Wake says so, changes nothing.
    with pytest.raises(ShimCallFailed) as refused:
        wake(kyb, kyb.namespace, name, tmp_path)
    assert "not hibernated" in refused.value.message
    kyb.ctr("tasks", "kill", "-s", "SIGKILL", name)
    assert run.proc.wait(30) == 137
    run.stop()


def test_hibernate_and_wake_a_cri_pod(kyb: Containerd, ctr_events: Lines, tmp_path: Path) -> None:
    namespace = "k8s.io"
    with kyb.cri() as cri:
        logs = tmp_path / "logs"
        logs.mkdir()
        config = cri.pod_config("hib", log_directory=str(logs))
        pod = cri.run_pod(config, runtime_handler="kybernate")
        cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", TALKER],
                                   log_path="counter.log", own_pid_namespace=True)
        # One sharing the pod's pid namespace (shareProcessNamespace) is refused, and runs on.
        shared = cri.create_container(pod, config, "shared", BUSYBOX_IMAGE, command=["sleep", "100000"])
        cri.start_container(shared)
        with pytest.raises(ShimCallFailed) as refused:
            hibernate(kyb, namespace, shared, tmp_path / "shared")
        assert "FAILED_PRECONDITION" in str(refused.value) and "pid namespace" in refused.value.message
        assert cri.container_status(shared).state == 1
        cri.start_container(cid)

        def cri_counts() -> list[int]:
            r = cri.exec_sync(cid, ["cat", "/count"])
            return [int(x) for x in r.stdout.decode().split()] if r.exit_code == 0 else []

        before = wait_for("the counter", lambda: (n := cri_counts()) and len(n) > 3 and n)[-1]
        status = cri.container_status(cid)
        assert status.state == 1  # CONTAINER_RUNNING

        hibernate(kyb, namespace, cid, tmp_path / "img")
        status = cri.container_status(cid)
        assert status.state == 1 and status.finished_at == 0 and status.exit_code == 0
        assert kyb.ctr("tasks", "ls", namespace=namespace).stdout.count("RUNNING") == 3  # pause, shared and ours

        wake(kyb, namespace, cid, tmp_path / "img")
        after = wait_for("the restored counter", lambda: (n := cri_counts()) and n[-1] > before + 3 and n)
        assert after == list(range(len(after)))
        status = cri.container_status(cid)
        assert status.state == 1 and status.finished_at == 0
        assert not seen(ctr_events, "/tasks/exit", cid)
        # The log goes on after the wake: CRI's reader of the stdout fifo never saw it close.
        log = logs / "counter.log"
        wait_for("log lines after the wake", lambda: f"out{after[-1] + 2}" in log.read_text())

        # Hibernated again, then the pod is stopped and removed: a clean stop, no wake.
        hibernate(kyb, namespace, cid, tmp_path / "img2")
        cri.stop_container(cid, grace_s=0)
        status = cri.container_status(cid)
        assert status.state == 2 and status.exit_code == 137  # CONTAINER_EXITED
        cri.stop_pod(pod)
        cri.remove_pod(pod)
        assert len(seen(ctr_events, "/tasks/exit", cid)) == 1


def test_hibernate_and_wake_a_detached_container(kyb: Containerd, tmp_path: Path) -> None:
    """`ctr run -d`: the stdio fifos have no reader once ctr has gone; the wake must not wait for one."""
    name = "hibd"
    kyb.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_IMAGE, name, "sh", "-c", TALKER)
    before = wait_for("the counter", lambda: (n := counts(kyb, name)) and len(n) > 3 and n)[-1]
    image = tmp_path / "img"
    image.mkdir()
    slept = asyncio.run(shim_hibernate(addresses(kyb, kyb.namespace, name), kyb.namespace, name, str(image),
                                       timeout=120))
    woke = asyncio.run(shim_wake(addresses(kyb, kyb.namespace, name), kyb.namespace, name, str(image), timeout=60))
    # runc's (CRIU's) own part of the dump and of the restore: the floors of a hibernate and a wake.
    assert 0 < slept.runc_dump_s <= slept.dump_s <= slept.total_s
    assert 0 < woke.criu_restore_s <= woke.runc_restore_s <= woke.total_s
    after = wait_for("the restored counter to move on", lambda: (n := counts(kyb, name)) and n[-1] > before + 3 and n)
    assert after == list(range(len(after)))
    kyb.ctr("tasks", "kill", "-s", "SIGKILL", name)


def test_a_failed_wake_leaves_it_hibernated_and_a_retry_wakes_it(kyb: Containerd, ctr_events: Lines,
                                                                   tmp_path: Path) -> None:
    import shutil

    name = "hibretry"
    run = run_attached(kyb, name)
    before = wait_for("the counter", lambda: (n := counts(kyb, name)) and len(n) > 3 and n)[-1]
    pid = hibernate(kyb, kyb.namespace, name, tmp_path / "img")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "img", broken)
    (broken / "inventory.img").unlink()  # CRIU cannot restore from this

    with pytest.raises(ShimCallFailed) as failed:
        wake(kyb, kyb.namespace, name, broken)
    assert "restore" in failed.value.message.lower()
    # Still hibernated, as containerd saw it all along: running with its old pid, no exit, the image untouched.
    assert task_status(kyb, name) == "RUNNING" and task_pid(kyb, name) == pid and run.proc.poll() is None
    r = kyb.ctr("tasks", "exec", "--exec-id", "x", name, "true", check=False)
    assert r.returncode != 0 and "hibernated" in r.stderr
    assert not seen(ctr_events, "/tasks/exit", name) and (tmp_path / "img" / "inventory.img").exists()

    wake(kyb, kyb.namespace, name, tmp_path / "img")  # the retry
    after = wait_for("the restored counter to move on", lambda: (n := counts(kyb, name)) and n[-1] > before + 3 and n)
    assert after == list(range(len(after)))
    assert not seen(ctr_events, "/tasks/exit", name)
    kyb.ctr("tasks", "kill", "-s", "SIGKILL", name)
    assert run.proc.wait(30) == 137
    run.stop()
