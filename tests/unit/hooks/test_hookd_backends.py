"""Driver backends (ctypes ABI, the cuda-checkpoint binary), run_blocking, and the metrics text."""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fakegpu
import pytest
from hookd_testlib import G0, G1, GiB, run, sample, until

from kybernate.hooks.gpu import blocking, cuda
from kybernate.hooks.gpu.binary import CudaCheckpointBinary
from kybernate.hooks.gpu.cuda import CudaDriver, CudaError, CudaState
from kybernate.hooks.api.errors import DriverUnavailable
from kybernate.hooks.hookd.manager import ContainerRef, GpuManager
from kybernate.hooks.hookd.metrics import Metrics, parse_address
from kybernate.hooks.gpu.nvml import Nvml
from kybernate.hooks.hookd.settings import ManagerSettings


def test_struct_layouts_match_cuda_h() -> None:
    for struct in (cuda.CUcheckpointLockArgs, cuda.CUcheckpointCheckpointArgs, cuda.CUcheckpointRestoreArgs,
                   cuda.CUcheckpointUnlockArgs):
        assert ctypes.sizeof(struct) == 64
    assert cuda.CUcheckpointLockArgs.timeoutMs.offset == 0 and cuda.CUcheckpointLockArgs.reserved1.offset == 8
    assert cuda.CUcheckpointRestoreArgs.gpuPairs.offset == 0
    assert cuda.CUcheckpointRestoreArgs.gpuPairsCount.offset == 8
    assert cuda.CUcheckpointRestoreArgs.reserved1.offset == 56
    assert ctypes.sizeof(cuda.CUcheckpointGpuPair) == 32 and cuda.CUcheckpointGpuPair.newUuid.offset == 16


def test_uuid_spellings() -> None:
    raw = bytes.fromhex("3ffe047a0b03a6b5a3590ecfad913d83")
    assert cuda.uuid_bytes(G0) == raw and cuda.uuid_text(raw) == G0
    assert cuda.normalize_uuid(G0.upper()) == G0
    with pytest.raises(ValueError):
        cuda.uuid_bytes("GPU-1234")


def test_ctypes_backend_reports_the_drivers_error_names(driver: CudaDriver, spawn: Callable[..., int]) -> None:
    pid = spawn("p")
    with pytest.raises(CudaError) as info:
        driver.checkpoint(pid)
    assert (info.value.name, info.value.code, info.value.pid) == ("CUDA_ERROR_ILLEGAL_STATE", 401, pid)
    assert driver.cuda_version == 13000 and driver.backend == "ctypes"
    assert driver.device_uuids() == [G0, G1]
    assert driver.restore_thread_id(pid) == pid  # the fake has no helper thread


def test_a_missing_driver_library_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DriverUnavailable, match="--libcuda"):
        CudaDriver(str(tmp_path / "libcuda.so.1"))


def test_binary_backend_drives_the_same_state_machine(fake_driver: fakegpu.Built, node: fakegpu.FakeNode,
                                                      spawn: Callable[..., int]) -> None:
    tool = CudaCheckpointBinary(str(fake_driver.cli))
    assert tool.backend == "binary" and tool.driver_version == "580.159.04"
    pid = spawn("p", G0, GiB)
    assert tool.get_state(pid) is CudaState.RUNNING
    with pytest.raises(CudaError) as info:
        tool.unlock(pid)
    assert info.value.name == "CUDA_ERROR_ILLEGAL_STATE" and "Could not unlock on process ID" in info.value.detail
    tool.lock(pid, 500)
    tool.checkpoint(pid)
    assert tool.get_state(pid) is CudaState.CHECKPOINTED
    assert tool.restore_thread_id(pid) == pid
    tool.restore(pid, [(G0, G1)])  # --device-map G0=G1
    tool.unlock(pid)
    assert node.state("p")["gpu"] == G1
    with pytest.raises(CudaError) as info:
        tool.get_state(4_194_000)
    assert info.value.name == "CUDA_ERROR_OPERATING_SYSTEM"
    node.set_faults(["lock busy 2000"])
    with pytest.raises(CudaError) as info:
        tool.lock(pid, 100)
    assert info.value.name == "CUDA_ERROR_TIMEOUT"


def test_binary_backend_under_the_manager(fake_driver: fakegpu.Built, nvml: Nvml, node: fakegpu.FakeNode,
                                          spawn: Callable[..., int]) -> None:
    a, b = spawn("a", G0, GiB), spawn("b", G1, GiB)
    tool = CudaCheckpointBinary(str(fake_driver.cli))

    async def go() -> None:
        with ThreadPoolExecutor(8) as pool:
            m = GpuManager(tool, nvml, ManagerSettings(), Metrics(), pool)
            manifest = (await m.checkpoint(ContainerRef("k8s.io", "c1", (a, b)))).manifest
            assert len(manifest.processes) == 2 and manifest.vram_bytes == 2 * GiB
            result = await m.restore(ContainerRef("k8s.io", "c1", (a, b)), manifest)
            assert [o.state_after for o in result.processes] == ["RUNNING", "RUNNING"]
            assert (await m.health()).backend == "binary"

    run(go())
    callers = {e.caller for e in node.events()}
    assert os.getpid() not in callers and len(callers) > 8  # one cuda-checkpoint process per step


def test_binary_backend_missing_tool(tmp_path: Path) -> None:
    with pytest.raises(DriverUnavailable, match="--backend ctypes"):
        CudaCheckpointBinary(str(tmp_path / "cuda-checkpoint"))


def test_run_blocking_does_not_abandon_a_call_when_its_caller_is_cancelled() -> None:
    finished: list[float] = []
    release = threading.Event()

    def slow() -> None:
        release.wait()
        finished.append(time.monotonic())

    async def go() -> None:
        with ThreadPoolExecutor(2) as pool:
            task = asyncio.create_task(blocking.run_blocking(slow, what="slow call", executor=pool))
            await until(lambda: blocking.in_flight(), "the call to start")
            assert [c.what for c in blocking.in_flight()] == ["slow call"]
            task.cancel()
            # The call ends only after the cancellation reached the caller: one that abandoned the call
            # would be done before `finished` is written.
            asyncio.get_running_loop().call_soon(release.set)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert finished, "the cancelled caller returned before the call did"
            assert blocking.in_flight() == []

    run(go())


def test_run_blocking_bounds_the_wait_and_hands_over_the_call() -> None:
    async def go() -> None:
        with ThreadPoolExecutor(2) as pool:
            release = threading.Event()
            with pytest.raises(blocking.StillRunning) as info:
                await blocking.run_blocking(release.wait, what="stuck", executor=pool, timeout_s=0.1)
            assert [c.what for c in blocking.in_flight()] == ["stuck"]  # the wait ended, the call did not
            release.set()
            await info.value.future  # the call goes on and completes
            assert blocking.in_flight() == []
            assert await blocking.run_blocking(sum, [1, 2], what="sum", executor=pool) == 3

    run(go())


def test_metrics_text_format() -> None:
    m = Metrics(in_flight=lambda: 3)
    m.step_done("lock", 0.0005)
    m.step_done("lock", 2.0)
    m.step_failed("checkpoint", 'CUDA_ERROR_"odd"')
    m.moved("device_to_host", 5)
    m.request("CheckpointGpu", "ok")
    text = m.render()
    assert sample(text, "kybernate_hookd_step_duration_seconds_bucket", step="lock", le="0.001") == 1
    assert sample(text, "kybernate_hookd_step_duration_seconds_bucket", step="lock", le="2.5") == 2
    assert sample(text, "kybernate_hookd_step_duration_seconds_sum", step="lock") == pytest.approx(2.0005)
    assert sample(text, "kybernate_hookd_step_duration_seconds_count", step="unlock") == 0
    assert 'error="CUDA_ERROR_\\"odd\\""' in text  # escaped in the text format
    assert sample(text, "kybernate_hookd_step_failures_total", step="checkpoint", error='CUDA_ERROR_"odd"') == 1
    assert sample(text, "kybernate_hookd_bytes_total", direction="device_to_host") == 5
    assert sample(text, "kybernate_hookd_driver_calls_in_flight") == 3
    assert "# TYPE kybernate_hookd_step_duration_seconds histogram" in text
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464) and parse_address("[::1]:1") == ("::1", 1)
    with pytest.raises(ValueError):
        parse_address("localhost")


def test_a_call_the_executor_refuses_is_not_listed_in_flight() -> None:
    async def go() -> None:
        pool = ThreadPoolExecutor(1)
        pool.shutdown()
        with pytest.raises(RuntimeError, match="shutdown"):
            await blocking.run_blocking(sum, [1], what="refused", executor=pool)
        assert blocking.in_flight() == []

    run(go())
