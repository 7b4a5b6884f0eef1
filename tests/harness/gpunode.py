"""A fake GPU node for integration tests: the named fake driver's state dir plus a real kybernate-hookd.

The hookd can be killed (-9), stopped and started again on the same socket, driver state and intent
directory, which is what the fault tests do to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .workload import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
import fakegpu  # noqa: E402

G0 = "GPU-3ffe047a-0b03-a6b5-a359-0ecfad913d83"
G1 = "GPU-5a1b2c3d-1111-2222-3333-444455556666"
H100 = "NVIDIA H100 80GB HBM3"
GiB = 1 << 30


class GpuNode:
    """A fake GPU node: the fake driver's state dir plus a real kybernate-hookd using it."""

    def __init__(self, tmp: Path, reconcile_period_s: float = 10.0, hookd_args: list[str] | None = None) -> None:
        self.built = fakegpu.build(Path("/tmp/kybernate-fakegpu"))
        self.node = fakegpu.FakeNode(tmp / "fakegpu")
        self.node.set_gpus([fakegpu.FakeGpu(G0, H100, 80 * GiB), fakegpu.FakeGpu(G1, H100, 80 * GiB)])
        self.socket = f"/run/kyb-test/hookd-{os.getpid()}-{time.monotonic_ns() % 10**6}.sock"
        self.intent_dir = tmp / "intent"
        self.reconcile_period_s = reconcile_period_s
        self.log = tmp / "hookd.log"
        # More flags for hookd (the store's: --containerd-address, --store-root, --s3-*, ...).
        self.hookd_args = list(hookd_args or [])
        # More hookd flags (the standby tests: --standby ...); a restart (stop + start) picks up a change.
        self.extra_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def spawn_hookd(self) -> subprocess.Popen[bytes]:
        """Start a hookd process on this node (without waiting for it): also how a racing second one starts."""
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "kybernate.hooks.hookd.daemon", "--socket", self.socket,
                 "--libcuda", str(self.built.libcuda), "--libnvml", str(self.built.libnvml),
                 "--metrics-address", "", "--log-level", "debug", "--intent-dir", str(self.intent_dir),
                 "--reconcile-period-s", str(self.reconcile_period_s), *self.hookd_args, *self.extra_args],
                env={**os.environ, **self.node.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def start(self) -> None:
        self.proc = self.spawn_hookd()
        proc = self.proc
        wait_for("hookd to listen", lambda: _listening(self.socket) or proc.poll() is not None, 30)
        assert proc.poll() is None, self.log.read_text()

    def kill9(self) -> None:
        """kill -9: no graceful stop, driver calls in flight die with it, the socket file stays."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop_hookd_gracefully(self) -> None:
        """SIGTERM, as systemd stops it; waits for the exit."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(60)

    def restart_hookd(self, hookd_args: list[str] | None = None) -> None:
        """Stop hookd gracefully and start it again, with other flags when given."""
        self.stop_hookd_gracefully()
        if hookd_args is not None:
            self.hookd_args = list(hookd_args)
        self.start()

    def runtime_toml(self, **kybernate: object) -> str:
        lines = [f'hookd_socket = "{self.socket}"', f'intent_dir = "{self.intent_dir}"'] + [
            f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in kybernate.items()]
        return "[kybernate]\n" + "\n".join(lines) + "\n"

    def container_env(self, proc_id: str, gpu_uuid: str = G0, vram: int = 2 * GiB) -> list[str]:
        env = {"NVIDIA_VISIBLE_DEVICES": "all", **self.node.env, **self.node.process_env(proc_id, gpu_uuid, vram)}
        return [arg for k, v in env.items() for arg in ("--env", f"{k}={v}")]

    def events(self, proc_id: str) -> list[fakegpu.Event]:
        return [e for e in self.node.events() if e.proc == proc_id and e.op != "get_state"]

    def gpu_state(self, proc_id: str) -> str:
        return self.node.state(proc_id).get("state", "RUNNING").upper()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.node.kill_all()


def _listening(path: str) -> bool:
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
