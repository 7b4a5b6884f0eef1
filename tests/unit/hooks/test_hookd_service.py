"""kybernate-hookd end to end: the daemon on a temporary unix socket, the shim's HookdClient, statuses
and trailing metadata, socket permissions, the metrics endpoint, and the daemon as a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import fakegpu
import pytest
from hookd_testlib import G0, G1, GiB, events_for, run, sample, until

from kybernate.hooks.api.client import HookdClient, HookdError, HookdUnavailable
from kybernate.hooks.hookd.daemon import Daemon, StartError
from kybernate.hooks.api.model import GpuManifest
from kybernate.hooks.hookd.reconcile_settings import ReconcileSettings
from kybernate.hooks.hookd.settings import DriverSettings, ManagerSettings, ServerSettings, Settings

REPO = Path(__file__).resolve().parents[3]


def settings(tmp_path: Path, fake: fakegpu.Built, **driver: str) -> Settings:
    return Settings(
        server=ServerSettings(socket=str(tmp_path / "run" / "kybernate" / "hookd.sock"), metrics_address="127.0.0.1:0",
                              shutdown_grace_s=1.0, stop_timeout_s=5.0),
        driver=DriverSettings(**{"libcuda": str(fake.libcuda), "libnvml": str(fake.libnvml), **driver}),
        manager=ManagerSettings(lock_grace_s=1.0),
        reconcile=ReconcileSettings(intent_dir=str(tmp_path / "intent")),
    )


@asynccontextmanager
async def serving(s: Settings) -> AsyncIterator[Daemon]:
    daemon = Daemon(s)
    await daemon.start()
    try:
        yield daemon
    finally:
        assert await daemon.stop() == 0


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data.decode()


def test_checkpoint_and_restore_through_the_socket(tmp_path: Path, fake_driver: fakegpu.Built,
                                                   node: fakegpu.FakeNode, spawn: Callable[..., int]) -> None:
    a, b = spawn("a", G0, 2 * GiB), spawn("b", G1, GiB)
    s = settings(tmp_path, fake_driver)

    async def go() -> None:
        async with serving(s) as daemon, HookdClient(s.server.socket) as client:
            sock = s.server.socket
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
            health = await client.health()
            assert (health.backend, health.nvml, health.driver_version, health.cuda_version) == \
                ("ctypes", True, "580.159.04", 13000)
            assert [g.uuid for g in health.gpus] == [G0, G1]

            manifest = await client.checkpoint_gpu("k8s.io", "c1", [a, b, os.getpid()], lock_timeout_ms=1000, deadline_s=10)
            assert [(p.pid, p.state, p.vram_bytes) for p in manifest.processes] == \
                [(a, "CHECKPOINTED", 2 * GiB), (b, "CHECKPOINTED", GiB)]
            # It goes into the checkpoint directory as kybernate.json and comes back from there.
            (tmp_path / "kybernate.json").write_text(manifest.to_json())
            again = GpuManifest.from_json((tmp_path / "kybernate.json").read_text())

            status = {s.pid: s for s in await client.status("k8s.io", "c1", [a, b])}
            assert status[a].state == "CHECKPOINTED" and status[a].gpu_uuids == (G0,)

            result = await client.restore_gpu("k8s.io", "c1", [a, b], manifest=again.to_dict(), gpu_map={G1: G0})
            assert result.remapped and [(p.old_uuid, p.new_uuid) for p in result.pairs] == [(G0, G1), (G1, G0)]
            assert [o.state_after for o in result.processes] == ["RUNNING", "RUNNING"]

            port = daemon.metrics_port
            assert port
            text = await http_get(port, "/metrics")
            assert text.startswith("HTTP/1.1 200 OK")
            for step in ("lock", "checkpoint", "restore", "unlock"):
                assert sample(text, "kybernate_hookd_step_duration_seconds_count", step=step) == 2
                assert sample(text, "kybernate_hookd_step_duration_seconds_bucket", step=step, le="+Inf") == 2
            assert sample(text, "kybernate_hookd_bytes_total", direction="device_to_host") == 3 * GiB
            assert sample(text, "kybernate_hookd_bytes_total", direction="host_to_device") == 3 * GiB
            assert sample(text, "kybernate_hookd_requests_total", rpc="CheckpointGpu", outcome="ok") == 1
            assert sample(text, "kybernate_hookd_driver_calls_in_flight") == 0
            assert (await http_get(port, "/nope")).startswith("HTTP/1.1 404")

    run(go())
    assert node.state("a")["gpu"] == G1 and node.state("b")["gpu"] == G0
    assert not os.path.exists(s.server.socket)  # removed on stop


def test_errors_arrive_as_statuses_with_the_failing_step(tmp_path: Path, fake_driver: fakegpu.Built,
                                                         node: fakegpu.FakeNode, spawn: Callable[..., int]) -> None:
    a, b = spawn("a", G0, 4 * GiB), spawn("b", G0, GiB)
    s = settings(tmp_path, fake_driver)

    async def go() -> None:
        async with serving(s) as daemon, HookdClient(s.server.socket) as client:
            node.set_faults(["checkpoint fail CUDA_ERROR_NOT_SUPPORTED proc=b"])
            with pytest.raises(HookdError) as info:
                await client.checkpoint_gpu("k8s.io", "c1", [a, b], deadline_s=10)
            err = info.value
            assert (err.code, err.code_name, err.pid, err.step, err.driver_error) == \
                (10, "ABORTED", b, "checkpoint", "CUDA_ERROR_NOT_SUPPORTED")
            assert "put back" in err.message

            node.clear_faults()
            manifest = await client.checkpoint_gpu("k8s.io", "c1", [a, b], deadline_s=10)
            hog = spawn("hog", G0, 77 * GiB)
            with pytest.raises(HookdError) as info:
                await client.restore_gpu("k8s.io", "c1", [a, b], manifest=manifest, deadline_s=10)
            assert info.value.code == 9 and "needs 5.00 GiB free, has 3.00 GiB" in info.value.message
            os.kill(hog, signal.SIGKILL)
            os.waitpid(hog, 0)

            with pytest.raises(HookdError) as info:
                await client.status("k8s.io", "c1", [])
            assert info.value.code == 3  # INVALID_ARGUMENT: neither pids nor cgroup

            metrics = await http_get(daemon.metrics_port or 0, "/metrics")
            assert sample(metrics, "kybernate_hookd_step_failures_total", step="checkpoint",
                          error="CUDA_ERROR_NOT_SUPPORTED") == 1
            assert sample(metrics, "kybernate_hookd_requests_total", rpc="RestoreGpu", outcome="FAILED_PRECONDITION") == 1

    run(go())


def test_client_reports_a_missing_or_dead_daemon_clearly(tmp_path: Path) -> None:
    missing = str(tmp_path / "nothing.sock")
    with pytest.raises(HookdUnavailable) as info:
        run(HookdClient(missing).checkpoint_gpu("k8s.io", "c1", [1], deadline_s=2))
    assert str(info.value).startswith(f"kybernate-hookd is not reachable at {missing}: start it "
                                      "(systemctl start kybernate-hookd)")
    stale = tmp_path / "stale.sock"  # a socket file left behind by a daemon that died
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(HookdUnavailable):
        run(HookdClient(str(stale)).health(deadline_s=2))


def test_importing_the_client_does_not_load_grpc() -> None:
    code = "import sys, kybernate.hooks.api.client; sys.exit(int('grpc' in sys.modules or 'google.protobuf' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_a_second_daemon_on_the_same_socket_is_refused(tmp_path: Path, fake_driver: fakegpu.Built,
                                                       node: fakegpu.FakeNode) -> None:
    s = settings(tmp_path, fake_driver)

    async def go() -> None:
        async with serving(s):
            second = Daemon(s)
            with pytest.raises(StartError, match="already serving"):
                await second.start()
            assert await second.stop() == 0
            assert os.path.exists(s.server.socket)  # the first one's socket is left alone

    run(go())


def test_the_daemon_process_serves_and_stops_on_sigterm(tmp_path: Path, fake_driver: fakegpu.Built,
                                                        node: fakegpu.FakeNode, spawn: Callable[..., int]) -> None:
    """As systemd runs it: NVML found through LD_LIBRARY_PATH, libcuda by --libcuda, logs on stderr."""
    a = spawn("a", G0, GiB)
    sock = tmp_path / "hookd.sock"
    env = {**os.environ, "LD_LIBRARY_PATH": str(fake_driver.dir), "FAKEGPU_STATE_DIR": str(node.dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kybernate.hooks.hookd.daemon", "--socket", str(sock), "--libcuda", str(fake_driver.libcuda),
         "--metrics-address", "", "--log-level", "info", "--intent-dir", str(tmp_path / "intent")],
        env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sock.exists(), proc.stderr.read() if proc.poll() is not None and proc.stderr else "no socket"

        async def go() -> None:
            async with HookdClient(str(sock)) as client:
                health = await client.health()
                assert health.nvml and len(health.gpus) == 2
                await client.checkpoint_gpu("default", "c1", [a], deadline_s=10)

        run(go())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not sock.exists()
        log = proc.stderr.read() if proc.stderr else ""
        assert "msg=serving" in log and "nvml=True" in log and "msg=checkpointed" in log and "msg=stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_names_a_driver_call_that_is_still_running(tmp_path: Path, fake_driver: fakegpu.Built,
                                                        node: fakegpu.FakeNode, spawn: Callable[..., int],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    a = spawn("a")
    node.set_faults(["lock stall 1200"])  # the target does not answer, as if SIGSTOPped after the check
    s = settings(tmp_path, fake_driver)
    s = Settings(server=replace(s.server, stop_timeout_s=0.3), driver=s.driver,
                 manager=replace(s.manager, lock_grace_s=0.1), reconcile=s.reconcile)

    async def go() -> int:
        daemon = Daemon(s)
        await daemon.start()
        async with HookdClient(s.server.socket) as client:
            with pytest.raises(HookdError) as info:
                await client.checkpoint_gpu("k8s.io", "c1", [a], lock_timeout_ms=100, deadline_s=10)
            assert info.value.code == 4 and info.value.step == "lock" and info.value.pid == a
        code = await daemon.stop()
        # The driver's event log has the lock once it returned: then the node may go away.
        await until(lambda: events_for(node, "lock", a), "the stalled lock to end before the node goes away")
        return code

    caplog.set_level("INFO")
    assert run(go()) == 1
    stuck = [r for r in caplog.records if r.getMessage().startswith("exiting with driver calls still running")]
    assert stuck and f"lock pid {a}" in stuck[0].fields["calls"]  # type: ignore[attr-defined]
