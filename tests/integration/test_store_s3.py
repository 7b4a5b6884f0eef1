"""The store's S3 tier with real containerd, runc and CRIU, a real kybernate-hookd and a real S3-compatible
server: hookd uploads a checkpoint in the background after it is complete locally; a node whose local
store was wiped restores `store:<key>` in a new pod through a download only; with S3 unreachable the local
checkpoint succeeds, `kybernate ls` shows the failed upload, and once S3 is back the retry uploads it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from harness.containerd import CRI_NAMESPACE, Containerd
from harness.cri import pb
from harness.gpunode import GpuNode
from harness.images import BUSYBOX_IMAGE
from harness.s3server import S3Server, free_port
from harness.workload import COUNTER, wait_for

pytestmark = pytest.mark.stack

ANNOTATION = "kybernate.io/restore-from"


def kybernate(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kybernate.hooks.cli.checkpoint_archive", *argv],
                          capture_output=True, text=True, timeout=120, env=env)


def counts(cri, cid: str) -> list[int]:
    return [int(x) for x in cri.exec_sync(cid, ["cat", "/count"]).stdout.split()]


def start_pod(cri, name: str, annotations: dict[str, str] | None = None) -> tuple[str, str]:
    config = cri.pod_config(name, annotations=annotations or {})
    pod = cri.run_pod(config, runtime_handler="kybernate")
    cid = cri.create_container(pod, config, "counter", BUSYBOX_IMAGE, command=["sh", "-c", COUNTER])
    return pod, cid


def checkpoint(hookd: GpuNode, cid: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return kybernate("checkpoint", cid, "--key", "web", "--socket", hookd.socket, "--namespace", CRI_NAMESPACE,
                     env=env)


def s3_hookd(store_hookd, c: Containerd, store: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch,
             *more: str) -> GpuNode:
    """hookd with the S3 tier: bucket, endpoint and prefix as flags, credentials from its environment."""
    for name, value in s3_server.env("cluster").items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return store_hookd(c, store, "--s3-bucket", s3_server.bucket, "--s3-endpoint", s3_server.endpoint,
                       "--s3-prefix", "cluster", "--upload-retry-max-s", "1", *more,
                       registry=Path(os.environ["KYBERNATE_REGISTRY"]))


def row_state(store: Path, env: dict[str, str]) -> tuple[str, list[str]]:
    [row] = ls(store, env)
    return str(row["state"]), list(row["tiers"])  # type: ignore[call-overload]


def ls(store: Path, env: dict[str, str]) -> list[dict[str, object]]:
    done = kybernate("ls", "--json", "--store", str(store), env=env)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


@pytest.mark.parametrize("version", ["1.6", "2.1"])
def test_a_wiped_node_restores_through_s3_only(kyb_factory, tmp_path: Path, s3_server: S3Server,
                                               version: str, store_hookd, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(tmp_path / "registry.db"))
    env = {**os.environ, **s3_server.env("cluster")}
    node_env = {k: v for k, v in env.items() if k.startswith(("KYBERNATE_S3_", "AWS_"))}
    c = kyb_factory(version, env={"KYBERNATE_STORE": str(store), **node_env})
    hookd = s3_hookd(store_hookd, c, store, s3_server, monkeypatch)
    with c.cri() as cri:
        pod, cid = start_pod(cri, "a")
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 10)
        done = checkpoint(hookd, cid, env)  # the container exits after the dump
        assert done.returncode == 0, done.stderr
        assert "upload queued" in done.stderr, done.stderr
        wait_for("pod A's container to exit", lambda: cri.container_status(cid).state == pb.CONTAINER_EXITED)
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    # hookd uploads in the background: the registry goes uploading -> uploaded.
    wait_for("the background upload", lambda: row_state(store, env)[0] == "uploaded", 60)
    [row] = ls(store, env)
    assert (row["key"], row["generation"], row["state"], row["tiers"]) == ("web", 1, "uploaded", ["local", "s3"])
    assert row["uploaded_bytes"] == row["size"] and row["attempts"] == 0, row
    # A wiped index rebuilds from the manifests, local and in S3, to the same `kybernate ls`.
    listed, table = ls(store, env), kybernate("ls", "--store", str(store), env=env).stdout
    os.unlink(tmp_path / "registry.db")
    done = kybernate("store", "rebuild", "--store", str(store), env=env)
    assert done.returncode == 0 and "1 generations indexed" in done.stderr and "s3://" in done.stderr, done.stderr

    def stable(rows: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in r.items() if k != "last_used"} for r in rows]

    assert stable(ls(store, env)) == stable(listed)
    assert kybernate("ls", "--store", str(store), env=env).stdout == table
    names = {o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix="cluster/web/1/")["Contents"]}
    assert "cluster/web/1/manifest.json" in names and "cluster/web/1/checkpoint/inventory.img" in names

    shutil.rmtree(store)  # a node that never saw the checkpoint
    with c.cri() as cri:
        pod, cid = start_pod(cri, "b", {ANNOTATION: "store:web"})
        cri.start_container(cid)
        assert cri.container_status(cid).state == pb.CONTAINER_RUNNING
        now = counts(cri, cid)
        assert now[-1] > 10, now  # restored, not started afresh
        restored = wait_for("the restored counter to move on",
                            lambda: (n := counts(cri, cid)) and n[-1] > now[-1] + 1 and n)
        assert restored == list(range(len(restored)))
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    # The download is a complete, verified local generation now.
    assert (store / "web" / "1" / "manifest.json").is_file()


def test_s3_unreachable_the_local_checkpoint_succeeds_and_ls_shows_the_failure(
        kyb_factory, tmp_path: Path, s3_server: S3Server, store_hookd, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(tmp_path / "registry.db"))
    env = {**os.environ, **s3_server.env("cluster")}
    s3_server.stop()  # nothing listens on its port now
    node_env = {k: v for k, v in env.items() if k.startswith(("KYBERNATE_S3_", "AWS_"))}
    c = kyb_factory("1.6", env={"KYBERNATE_STORE": str(store), **node_env})
    port = free_port()
    hookd = s3_hookd(store_hookd, c, store, s3_server, monkeypatch, "--metrics-address", f"127.0.0.1:{port}")
    with c.cri() as cri:
        pod, cid = start_pod(cri, "a")
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 3)
        done = checkpoint(hookd, cid, env)
        assert done.returncode == 0, done.stderr
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    wait_for("the upload to fail", lambda: row_state(store, env)[0] == "failed", 60)
    text = metrics(port)
    assert sample(text, "kybernate_hookd_store_upload_backlog") == 1
    assert sample(text, "kybernate_hookd_store_failures_total", tier="s3", operation="upload") >= 1
    assert sample(text, "kybernate_hookd_store_bytes_total", tier="local", operation="checkpoint") > 0
    [row] = ls(store, env)
    assert (row["state"], row["tiers"]) == ("failed", ["local"]), row
    assert f"127.0.0.1:{s3_server.port}" in str(row["error"]), row
    table = kybernate("ls", "--store", str(store), env=env)
    assert "failed (upload:" in table.stdout, table.stdout
    # S3 back: hookd's retry (backoff capped at 1 s here) uploads it, manifest last.
    s3_server.start()
    wait_for("the retried upload", lambda: row_state(store, env) == ("uploaded", ["local", "s3"]), 60)
    [row] = ls(store, env)
    assert row["attempts"] >= 1 and row["error"] == "", row
    text = metrics(port)
    assert sample(text, "kybernate_hookd_store_upload_backlog") == 0
    assert sample(text, "kybernate_hookd_store_bytes_total", tier="s3", operation="upload") == row["size"]
    assert sample(text, "kybernate_hookd_store_duration_seconds_count", tier="s3", operation="upload") == 1
    assert sample(text, "kybernate_hookd_store_duration_seconds_count", tier="local", operation="pause") == 1
    names = {o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix="cluster/web/1/")["Contents"]}
    assert "cluster/web/1/manifest.json" in names
    # S3 configured but unreachable: the shim's restore falls back to the local copy.
    with c.cri() as cri:
        pod, cid = start_pod(cri, "b", {ANNOTATION: "store:web"})
        cri.start_container(cid)
        assert counts(cri, cid)[-1] > 3
        cri.stop_pod(pod)
        cri.remove_pod(pod)


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series of the Prometheus text format."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == want:
            return float(value)
    raise AssertionError(f"no series {want} in the metrics")


def connected_to(port: int) -> bool:
    """Whether any TCP connection to 127.0.0.1:`port` is established (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state = fields[2], fields[3]
        if state == "01" and remote.endswith(f":{port:04X}"):
            return True
    return False


def test_hookd_killed_mid_upload_and_restarted_finishes_it(kyb_factory, tmp_path: Path, s3_server: S3Server,
                                                           store_hookd, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(tmp_path / "registry.db"))
    env = {**os.environ, **s3_server.env("cluster")}
    c = kyb_factory("2.1", env={"KYBERNATE_STORE": str(store)})
    hookd = s3_hookd(store_hookd, c, store, s3_server, monkeypatch)
    assert s3_server.proc is not None
    os.kill(s3_server.proc.pid, signal.SIGSTOP)  # connections are accepted by the kernel, never answered
    try:
        with c.cri() as cri:
            pod, cid = start_pod(cri, "a")
            cri.start_container(cid)
            wait_for("the counter", lambda: len(counts(cri, cid)) > 3)
            done = checkpoint(hookd, cid, env)
            assert done.returncode == 0 and "upload queued" in done.stderr, done.stderr
            cri.stop_pod(pod)
            cri.remove_pod(pod)
        # The upload is in flight (queued in the registry, connected to the server) when hookd dies.
        wait_for("the upload to be in flight", lambda: row_state(store, env)[0] == "uploading"
                 and connected_to(s3_server.port), 30)
        hookd.kill9()
    finally:
        os.kill(s3_server.proc.pid, signal.SIGCONT)
    assert row_state(store, env) == ("uploading", ["local"])
    hookd.start()  # a restarted hookd resumes what the registry says is queued
    wait_for("the resumed upload", lambda: row_state(store, env) == ("uploaded", ["local", "s3"]), 60)
    assert "uploads_resumed=1" in hookd.log.read_text()
    # Complete remotely, manifest included: a fresh store downloads and verifies it.
    done = kybernate("prefetch", "web", "--store", str(tmp_path / "fresh"), "--registry",
                     str(tmp_path / "fresh.db"), env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "fresh" / "web" / "1" / "manifest.json").is_file()


def test_retention_reaches_s3_after_hookd_uploads_a_newer_generation(
        kyb_factory, tmp_path: Path, s3_server: S3Server, store_hookd, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(tmp_path / "registry.db"))
    env = {**os.environ, **s3_server.env("cluster")}
    c = kyb_factory("2.1", env={"KYBERNATE_STORE": str(store)})
    hookd = s3_hookd(store_hookd, c, store, s3_server, monkeypatch, "--store-keep", "1")
    tier = s3_tier(s3_server)
    with c.cri() as cri:
        pod, cid = start_pod(cri, "a")
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 3)
        for number in (1, 2):
            done = kybernate("checkpoint", cid, "--key", "web", "--leave-running", "--socket", hookd.socket,
                             "--namespace", CRI_NAMESPACE, env=env)
            assert done.returncode == 0, done.stderr
            wait_for(f"web@{number} in S3", lambda n=number: n in tier.generations("web"), 60)  # type: ignore[misc]
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    # Once web@2 is complete in S3, hookd's retention (keep 1) deletes web@1 there too: no object is left.
    wait_for("web@1 gone from S3", lambda: not s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix="cluster/web/1/").get("Contents"), 60)
    assert tier.generations("web") == [2] and os.listdir(store / "web") == ["2"]
    rows = ls(store, env)
    assert [(r["generation"], r["state"], r["tiers"]) for r in rows] == [(2, "uploaded", ["local", "s3"])], rows
    assert "web@1 (retention: keep 1, s3)" in hookd.log.read_text()


def s3_tier(s3_server: S3Server):  # type: ignore[no-untyped-def]
    from kybernate.hooks.api.store_s3 import S3Config, S3Tier

    config = S3Config.from_env(s3_server.env("cluster"))
    assert config is not None
    return S3Tier(config)


def test_a_rebuild_queues_what_s3_lacks_and_the_running_hookd_uploads_it(
        kyb_factory, tmp_path: Path, s3_server: S3Server, store_hookd, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("KYBERNATE_REGISTRY", str(tmp_path / "registry.db"))
    env = {**os.environ, **s3_server.env("cluster")}
    c = kyb_factory("1.6", env={"KYBERNATE_STORE": str(store)})
    local_only = store_hookd(c, store)  # no S3 tier yet: the checkpoint is `complete`, nothing queued
    with c.cri() as cri:
        pod, cid = start_pod(cri, "a")
        cri.start_container(cid)
        wait_for("the counter", lambda: len(counts(cri, cid)) > 3)
        done = kybernate("checkpoint", cid, "--key", "web", "--leave-running", "--socket", local_only.socket,
                         "--namespace", CRI_NAMESPACE, env=env)
        assert done.returncode == 0 and "upload queued" not in done.stderr, done.stderr
        cri.stop_pod(pod)
        cri.remove_pod(pod)
    local_only.stop()
    assert row_state(store, env) == ("complete", ["local"])
    # hookd now with the S3 tier: nothing is queued at its start. The index is lost and rebuilt with the S3 tier
    # configured: web@1, which S3 lacks, is queued again, and the running hookd picks it up and uploads it.
    s3_hookd(store_hookd, c, store, s3_server, monkeypatch, "--upload-rescan-s", "0.2")
    os.unlink(tmp_path / "registry.db")
    done = kybernate("store", "rebuild", "--store", str(store), env=env)
    assert done.returncode == 0 and "1 local ones S3 lacks are queued for upload" in done.stderr, done.stderr
    assert row_state(store, env)[0] in ("uploading", "uploaded")
    wait_for("the queued upload", lambda: row_state(store, env) == ("uploaded", ["local", "s3"]), 60)
    assert s3_tier(s3_server).generations("web") == [1]
