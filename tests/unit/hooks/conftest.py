"""Fixtures for kybernate-hookd's tests: the named fake GPU driver (built with gcc once per session),
a fake node per test, real `sleep` processes that the fake treats as CUDA processes, and a real
cgroup freezer to pause them."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hookd_testlib import G0, G1, H100, Freezer, GiB, wait_exec  # noqa: E402  (puts tests/fakes on sys.path)

import fakegpu  # noqa: E402

from kybernate.hooks.gpu.cuda import CudaDriver  # noqa: E402
from kybernate.hooks.hookd.manager import GpuManager  # noqa: E402
from kybernate.hooks.hookd.metrics import Metrics  # noqa: E402
from kybernate.hooks.gpu.nvml import Nvml  # noqa: E402
from kybernate.hooks.hookd.settings import ManagerSettings  # noqa: E402


@pytest.fixture(scope="session")
def fake_driver(tmp_path_factory: pytest.TempPathFactory) -> fakegpu.Built:
    return fakegpu.build(tmp_path_factory.mktemp("fakegpu"))


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[fakegpu.FakeNode]:
    """A fresh fake node with two H100s; the fake libraries in this process read it through the env."""
    n = fakegpu.FakeNode(tmp_path / "gpustate")
    monkeypatch.setenv("FAKEGPU_STATE_DIR", str(n.dir))
    monkeypatch.setenv("FAKEGPU_HANG_LIMIT_MS", "10000")  # a test bug must not hang the suite
    n.set_gpus([fakegpu.FakeGpu(G0, H100, 80 * GiB), fakegpu.FakeGpu(G1, H100, 80 * GiB)])
    yield n
    n.kill_all()


@pytest.fixture
def spawn(node: fakegpu.FakeNode) -> Callable[..., int]:
    """spawn(proc_id, gpu=G0, vram=GiB) -> pid of a live fake CUDA process."""

    def _spawn(proc_id: str, gpu: str = G0, vram: int = GiB) -> int:
        proc = node.spawn(proc_id, gpu, vram)
        wait_exec(proc.pid)
        return proc.pid

    return _spawn




@pytest.fixture
def driver(fake_driver: fakegpu.Built, node: fakegpu.FakeNode) -> CudaDriver:
    return CudaDriver(str(fake_driver.libcuda))


@pytest.fixture
def nvml(fake_driver: fakegpu.Built, node: fakegpu.FakeNode) -> Iterator[Nvml]:
    n = Nvml(str(fake_driver.libnvml))
    assert n.start(), n.error
    yield n
    n.close()


@pytest.fixture
def make_manager(driver: CudaDriver, nvml: Nvml) -> Iterator[Callable[..., GpuManager]]:
    """make_manager(**ManagerSettings fields) -> a GpuManager on the fake driver (call inside the loop)."""
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="test-driver")

    def _make(**overrides: Any) -> GpuManager:
        settings = replace(ManagerSettings(lock_grace_s=1.0, query_timeout_s=5.0), **overrides)
        return GpuManager(driver, nvml, settings, Metrics(), executor)

    yield _make
    executor.shutdown(wait=True)


@pytest.fixture
def freezer(request: pytest.FixtureRequest) -> Iterator[Freezer]:
    name = f"kyb-hooks-test-{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**8}"
    v1 = Path("/sys/fs/cgroup/freezer")
    v2 = next((p for p in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")) if (p / "cgroup.controllers").exists()),
              None)
    try:
        if (v1 / "freezer.state").exists() or (v1 / "cgroup.procs").exists():
            f = Freezer(v1 / name, v1=True)
        elif v2 is not None:
            f = Freezer(v2 / name, v1=False)
        else:
            pytest.fail("no cgroup freezer on this machine: the hookd tests need cgroup v1 freezer or cgroup v2")
    except PermissionError:
        pytest.fail("creating a cgroup needs root: run the tests as root (make test does)")
    yield f
    f.remove()
