"""Preemption resilience and scale-out (docs/resilience.md) with real containerd, runc, CRIU and a real S3
server, the CRI played as the kubelet plays it:

- `kybernate.io/resume: latest` on a key without a checkpoint starts fresh; with one, continues from it.
- five pods restoring one `store:<key>` at once on a node that never saw it: each restores, and the
  generation is downloaded from S3 once (the store's per-key lock), not five times.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness.containerd import CRI_NAMESPACE
from harness.cri import pb
from harness.images import BUSYBOX_IMAGE
from harness.s3server import S3Server
from harness.workload import COUNTER, wait_for

pytestmark = pytest.mark.stack

RESUME = "kybernate.io/resume"
RESTORE_FROM = "kybernate.io/restore-from"
KEY = "kybernate.io/checkpoint-key"


def kybernate(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def counts(cri, cid: str) -> list[int]:
    return [int(x) for x in cri.exec_sync(cid, ["cat", "/count"]).stdout.split()]


def start_pod(cri, name: str, annotations: dict[str, str]) -> tuple[str, str]:
    config = cri.pod_config(name, annotations=annotations)
    pod = cri.run_pod(config, runtime_handler="kybernate")
    cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER])
    return pod, cid


def s3_env(s3_server: S3Server, tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(the CLI's environment, the node's: what containerd and its shims see)."""
    env = {**os.environ, **s3_server.env("cluster"), "KYBERNATE_REGISTRY": str(tmp_path / "registry.db")}
    return env, {k: v for k, v in env.items() if k.startswith(("KYBERNATE_S3_", "AWS_"))}


def checkpoint(hookd, cid: str, key: str, env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """`kybernate checkpoint`: kybernate-hookd's Store.Checkpoint (the container exits after the dump)."""
    done = kybernate("checkpoint", cid, "--key", key, "--socket", hookd.socket, "--namespace", CRI_NAMESPACE,
                     env=env)
    assert done.returncode == 0, done.stderr


def object_puts(s3_server: S3Server, key: str) -> int:
    """PUT requests the S3 server logged for one object (its request log, one line per request)."""
    return s3_server.requests("PUT", key).count(key)


def object_gets(s3_server: S3Server, key: str) -> int:
    """GET requests the S3 server logged for one object (its request log, one line per request)."""
    return s3_server.requests("GET", key).count(key)


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_resume_latest_starts_fresh_without_a_checkpoint_and_continues_with_one(
        kyb_factory, store_hookd, tmp_path: Path, version: str) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "KYBERNATE_REGISTRY": str(tmp_path / "registry.db")}
    c = kyb_factory(version, env={"KYBERNATE_STORE": str(store)})
    hookd = store_hookd(c, store, registry=tmp_path / "registry.db")
    notes = {KEY: "job-7", RESUME: "latest"}
    with c.cri() as cri:
        pod, cid = start_pod(cri, "first", notes)
        cri.start_container(cid)
        first = wait_for("the fresh counter", lambda: (n := counts(cri, cid)) and len(n) > 10 and n)
        assert first[0] == 0  # started fresh: the key had no checkpoint
        last = counts(cri, cid)[-1]  # the dump comes later: the restored count is at least this
        checkpoint(hookd, cid, "job-7", env)
        wait_for("the first container to exit", lambda: cri.container_status(cid).state == pb.CONTAINER_EXITED)
        cri.stop_pod(pod)
        cri.remove_pod(pod)

        pod, cid = start_pod(cri, "replacement", notes)
        cri.start_container(cid)
        now = counts(cri, cid)
        assert now[-1] >= last, (now[-1], last)  # continued from the checkpoint, not from 0
        moved = wait_for("the counter to move on", lambda: (n := counts(cri, cid)) and n[-1] > last + 1 and n)
        assert moved == list(range(len(moved)))
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    assert "resume: latest: the key has no complete checkpoint; starting fresh" in c.log_text()


@pytest.mark.parametrize("version", ["2.1"])
def test_five_pods_restore_one_snapshot_at_once_with_one_download(
        kyb_factory, store_hookd, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch,
        version: str) -> None:
    env, node_env = s3_env(s3_server, tmp_path)
    for name, value in node_env.items():
        monkeypatch.setenv(name, value)  # hookd uploads with them
    store_a, store_b = tmp_path / "store-a", tmp_path / "store-b"
    a = kyb_factory(version, env={"KYBERNATE_STORE": str(store_a), **node_env})
    hookd = store_hookd(a, store_a, registry=tmp_path / "registry.db")
    with a.cri() as cri:
        pod, cid = start_pod(cri, "origin", {})
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 10)
        last = counts(cri, cid)[-1]
        checkpoint(hookd, cid, "web", env)  # the container exits after the dump; hookd uploads it
        wait_for("the container to exit", lambda: cri.container_status(cid).state == pb.CONTAINER_EXITED)
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    wait_for("the upload to S3", lambda: object_puts(s3_server, "cluster/web/1/manifest.json"), 60)
    a.stop()
    assert object_gets(s3_server, "cluster/web/1/checkpoint/inventory.img") == 0

    # Node B has never seen the key: five replicas are created at once, as a scale-out does.
    b = kyb_factory(version, env={"KYBERNATE_STORE": str(store_b), **node_env})

    def replica(i: int) -> tuple[str, str]:
        with b.cri() as cri:
            pod, cid = start_pod(cri, f"replica-{i}", {RESTORE_FROM: "store:web"})
            cri.start_container(cid)  # CRI creates the task, and so the shim restores, at StartContainer
            return pod, cid

    with ThreadPoolExecutor(5) as pool:
        replicas = list(pool.map(replica, range(5)))
    assert object_gets(s3_server, "cluster/web/1/checkpoint/inventory.img") == 1  # one download for the node
    assert object_gets(s3_server, "cluster/web/1/checkpoint/pages-1.img") >= 1
    assert sorted(os.listdir(store_b / "web")) == ["1"]
    with b.cri() as cri:
        restored = [counts(cri, cid) for _, cid in replicas]
        for (_, cid), now in zip(replicas, restored, strict=True):
            assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
            assert now[-1] >= last  # restored, not started afresh
        # All from the same snapshot: the counts they share are the same.
        shortest = min(len(n) for n in restored)
        assert len({tuple(n[:shortest]) for n in restored}) == 1
        for _, cid in replicas:
            moved = wait_for("each replica to count on", lambda cid=cid: (n := counts(cri, cid)) and n[-1] > last + 1
                             and n)
            assert moved == list(range(len(moved)))
        for pod, _ in replicas:
            cri.stop_pod(pod)
            cri.remove_pod(pod)
