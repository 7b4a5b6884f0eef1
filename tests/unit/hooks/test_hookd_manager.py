"""GpuManager on the fake driver with real processes: the state machine, parallelism, rollback,
pausing, timeouts, the VRAM pre-check and GPU remapping."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import fakegpu
import pytest
from hookd_testlib import A100, G0, G1, G2, H100, GiB, Freezer, events_for, run, until

from kybernate.hooks.gpu import blocking
from kybernate.hooks.gpu.cuda import CudaDriver, CudaState
from kybernate.hooks.api.errors import (
    INTERNAL,
    FailedPrecondition,
    InsufficientVram,
    InvalidRequest,
    LockTimeout,
    NoMatchingGpu,
    ProcessBusy,
    ProcessPaused,
    RollbackFailed,
    StepFailed,
)
from kybernate.hooks.hookd.manager import ContainerRef, GpuManager, plan_gpu_pairs
from kybernate.hooks.api.model import GpuDeviceRecord, GpuManifest, GpuPair, GpuProcessRecord, ManifestError, NodeGpu

Spawn = Callable[..., int]
MakeManager = Callable[..., GpuManager]


def ref(*pids: int, cid: str = "c1") -> ContainerRef:
    return ContainerRef("k8s.io", cid, tuple(pids))


def states(driver: CudaDriver, *pids: int) -> list[CudaState]:
    return [driver.get_state(p) for p in pids]


def test_checkpoint_restore_round_trip(make_manager: MakeManager, driver: CudaDriver, node: fakegpu.FakeNode,
                                       spawn: Spawn) -> None:
    a, b, c = spawn("a", G0, 2 * GiB), spawn("b", G0, 3 * GiB), spawn("c", G1, 4 * GiB)
    pids = (a, b, c, os.getpid())  # hookd sees every pid of the container; ours is no CUDA process

    async def go() -> None:
        m = make_manager()
        result = await m.checkpoint(ref(*pids), lock_timeout_ms=1000)
        manifest = result.manifest
        assert [(g.uuid, g.name, g.index, g.vram_used_bytes) for g in manifest.gpus] == [
            (G0, H100, 0, 5 * GiB), (G1, H100, 1, 4 * GiB)]
        assert [(p.pid, p.state, p.gpu_uuids, p.vram_bytes) for p in manifest.processes] == [
            (a, "CHECKPOINTED", (G0,), 2 * GiB), (b, "CHECKPOINTED", (G0,), 3 * GiB), (c, "CHECKPOINTED", (G1,), 4 * GiB)]
        assert manifest.driver_version == "580.159.04" and manifest.created_at.endswith("Z")
        assert [o.state_before for o in result.processes] == ["RUNNING"] * 3
        assert [[s.step for s in o.steps] for o in result.processes] == [["lock", "checkpoint"]] * 3
        assert states(driver, a, b, c) == [CudaState.CHECKPOINTED] * 3
        inv = m._nvml.inventory()
        assert inv is not None and [g.memory_free_bytes for g in inv.gpus] == [80 * GiB, 80 * GiB]

        restored = await m.restore(ref(*pids), manifest)
        assert restored.remapped is False
        assert restored.pairs == (GpuPair(G0, G0), GpuPair(G1, G1))
        assert [[s.step for s in o.steps] for o in restored.processes] == [["restore", "unlock"]] * 3
        assert states(driver, a, b, c) == [CudaState.RUNNING] * 3
        inv = m._nvml.inventory()
        assert inv is not None and [g.memory_free_bytes for g in inv.gpus] == [75 * GiB, 76 * GiB]

    run(go())
    assert all(e.pairs == 0 for e in events_for(node, "restore"))  # same GPUs: no pairs to the driver
    assert not events_for(node, pid=os.getpid(), op="lock")


def test_a_container_without_cuda_processes_gets_an_empty_manifest_fast(make_manager: MakeManager,
                                                                          node: fakegpu.FakeNode) -> None:
    result = run(make_manager().checkpoint(ref(os.getpid(), os.getppid())))
    assert result.manifest.empty and result.manifest.gpus == () and result.processes == ()
    assert {e.op for e in node.events()} == {"get_state"}  # fast: nothing but a state query per process


def test_checkpoint_and_restore_are_idempotent(make_manager: MakeManager, driver: CudaDriver,
                                               node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a, b = spawn("a", G0, 2 * GiB), spawn("b", G1, GiB)
    driver.lock(b, 1000)  # a half-done earlier attempt: b is already LOCKED

    async def go() -> None:
        m = make_manager()
        first = await m.checkpoint(ref(a, b))
        assert [o.state_before for o in first.processes] == ["RUNNING", "LOCKED"]
        assert [[s.step for s in o.steps] for o in first.processes] == [["lock", "checkpoint"], ["checkpoint"]]
        calls = len(node.events())
        again = await m.checkpoint(ref(a, b))
        assert [o.steps for o in again.processes] == [(), ()]
        assert again.manifest.processes == first.manifest.processes  # remembered: NVML no longer sees them
        assert again.manifest.gpus == first.manifest.gpus
        assert {e.op for e in node.events()[calls:]} == {"get_state"}
        await m.restore(ref(a, b), first.manifest)
        calls = len(node.events())
        noop = await m.restore(ref(a, b), first.manifest)
        assert [(o.state_before, o.steps) for o in noop.processes] == [("RUNNING", ()), ("RUNNING", ())]
        assert {e.op for e in node.events()[calls:]} == {"get_state"}

    run(go())
    assert states(driver, a, b) == [CudaState.RUNNING] * 2


def test_processes_are_checkpointed_in_parallel(make_manager: MakeManager, node: fakegpu.FakeNode,
                                                spawn: Spawn) -> None:
    pids = [spawn(f"p{i}", G0 if i % 2 else G1, GiB) for i in range(4)]
    node.set_faults(["checkpoint delay 300", "restore delay 300"])

    async def go() -> None:
        m = make_manager()
        manifest = (await m.checkpoint(ref(*pids))).manifest
        await m.restore(ref(*pids), manifest)

    run(go())
    # In parallel: the driver's own log shows every call of a kind in flight at once (below).
    for op in ("checkpoint", "restore"):
        calls = events_for(node, op)
        assert len(calls) == 4
        assert max(e.start_ns for e in calls) < min(e.ns for e in calls), f"{op}: all four were in flight at once"


def test_one_failure_rolls_the_whole_container_back(make_manager: MakeManager, driver: CudaDriver,
                                                    node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a, b, c = spawn("a"), spawn("b"), spawn("c")
    node.set_faults(["checkpoint fail proc=b"])
    with pytest.raises(StepFailed) as info:
        run(make_manager().checkpoint(ref(a, b, c)))
    err = info.value
    assert (err.code, err.pid, err.step, err.driver_error) == (10, b, "checkpoint", "CUDA_ERROR_UNKNOWN")
    assert f"pid {b}: checkpoint failed: CUDA_ERROR_UNKNOWN" in err.message and "put back" in err.message
    assert states(driver, a, b, c) == [CudaState.RUNNING] * 3
    for pid in (a, c):  # checkpointed, then restored and unlocked by the rollback
        ops = [e.op for e in events_for(node, pid=pid) if e.op != "get_state"]
        assert ops == ["lock", "checkpoint", "restore", "unlock"]
    assert [e.op for e in events_for(node, pid=b) if e.op != "get_state"] == ["lock", "checkpoint", "unlock"]


def test_a_failed_rollback_is_reported_with_what_is_left(make_manager: MakeManager, driver: CudaDriver,
                                                         node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a, b = spawn("a"), spawn("b")
    node.set_faults(["checkpoint fail proc=b", "restore fail CUDA_ERROR_OUT_OF_MEMORY proc=a"])
    with pytest.raises(RollbackFailed) as info:
        run(make_manager().checkpoint(ref(a, b)))
    assert info.value.code == INTERNAL
    assert f"pid {a}" in info.value.message and "CUDA_ERROR_OUT_OF_MEMORY" in info.value.message
    assert states(driver, a, b) == [CudaState.CHECKPOINTED, CudaState.RUNNING]


def test_a_lock_that_times_out_in_the_driver_rolls_back(make_manager: MakeManager, driver: CudaDriver,
                                                        node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a, b = spawn("a"), spawn("b")
    node.set_faults(["lock busy 5000 proc=b"])  # b's submitted GPU work takes 5 s to drain
    with pytest.raises(LockTimeout) as info:
        run(make_manager().checkpoint(ref(a, b), lock_timeout_ms=200))
    assert (info.value.code, info.value.pid, info.value.driver_error) == (4, b, "CUDA_ERROR_TIMEOUT")
    assert "lock timed out after 200 ms" in info.value.message
    assert states(driver, a, b) == [CudaState.RUNNING] * 2


def test_a_frozen_container_is_refused_without_calling_the_driver(make_manager: MakeManager, node: fakegpu.FakeNode,
                                                                  spawn: Spawn, freezer: Freezer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    a, b = spawn("a"), spawn("b")
    plain = subprocess.Popen(["sleep", "60"])  # no CUDA; its pid sorts after b's
    freezer.add(b)
    freezer.freeze()
    with pytest.raises(ProcessPaused) as info:
        run(make_manager().checkpoint(ref(a, b, plain.pid), lock_timeout_ms=200))
    plain.kill()
    plain.wait()
    assert info.value.code == 9 and info.value.pid == b and "frozen" in info.value.message
    del info  # its traceback keeps the request's tasks alive
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]  # every task's outcome was read
    assert not events_for(node, pid=b)  # a driver call would have blocked until the thaw
    assert not events_for(node, "lock")
    freezer.thaw()
    run(make_manager().checkpoint(ref(a, b)))


def test_a_lock_that_never_returns_is_bounded_then_settled(make_manager: MakeManager, driver: CudaDriver,
                                                           node: fakegpu.FakeNode, spawn: Spawn) -> None:
    """The driver ignores the lock timeout while the target is stopped: hookd gives up waiting after
    timeout + grace, reports DEADLINE_EXCEEDED, refuses the pid meanwhile, and unlocks it when the
    late lock finally returns."""
    a, b = spawn("a"), spawn("b")
    node.set_faults(["lock stall 1500 proc=b"])

    async def go() -> None:
        m = make_manager(lock_grace_s=0.2)
        with pytest.raises(LockTimeout) as info:
            await m.checkpoint(ref(a, b), lock_timeout_ms=100)
        assert info.value.pid == b and "did not return within" in info.value.message
        assert states(driver, a) == [CudaState.RUNNING]  # rolled back already
        status = {s.pid: s for s in await m.status(ref(a, b))}
        assert "pending" in status[b].note and status[a].state == "RUNNING"
        with pytest.raises(ProcessBusy):
            await m.checkpoint(ref(a, b))
        await until(lambda: not m.busy(), "the stalled lock to return")
        await m.wait_settled()
        assert m.busy() == []

    run(go())
    assert states(driver, a, b) == [CudaState.RUNNING] * 2
    assert [(e.op, e.result) for e in events_for(node, pid=b) if e.op != "get_state"] == [
        ("lock", "CUDA_SUCCESS"), ("unlock", "CUDA_SUCCESS")]


def test_a_caller_that_goes_away_mid_checkpoint_leaves_nothing_half_done(
        make_manager: MakeManager, driver: CudaDriver, node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a, b = spawn("a"), spawn("b")
    node.set_faults(["checkpoint delay 400"])

    async def go() -> None:
        m = make_manager()
        task = asyncio.create_task(m.checkpoint(ref(a, b)))
        await until(lambda: sorted(c.what for c in blocking.in_flight()) == sorted(
            [f"checkpoint pid {a}", f"checkpoint pid {b}"]), "both checkpoints to be inside the driver")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert m.busy() == []

    run(go())
    assert states(driver, a, b) == [CudaState.RUNNING] * 2
    assert [e.op for e in events_for(node, pid=a) if e.op != "get_state"] == ["lock", "checkpoint", "restore", "unlock"]


def test_restore_refuses_when_the_gpu_lacks_free_vram(make_manager: MakeManager, driver: CudaDriver,
                                                      node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a = spawn("a", G0, 4 * GiB)

    async def go() -> None:
        m = make_manager()
        manifest = (await m.checkpoint(ref(a))).manifest
        hog = spawn("hog", G0, 78 * GiB)  # someone took the GPU while the container was checkpointed
        with pytest.raises(InsufficientVram) as info:
            await m.restore(ref(a), manifest)
        message = info.value.message
        assert info.value.code == 9
        assert f"GPU 0 {G0} ({H100}) needs 4.00 GiB free, has 2.00 GiB" in message
        assert "Nothing was changed" in message
        assert not events_for(node, "restore")  # the driver was not asked: it would have stranded the process
        assert states(driver, a) == [CudaState.CHECKPOINTED]
        os.kill(hog, 9)
        os.waitpid(hog, 0)
        await m.restore(ref(a), manifest)

    run(go())
    assert states(driver, a) == [CudaState.RUNNING]


def test_restore_remaps_to_the_same_model_when_the_gpu_is_gone(make_manager: MakeManager, driver: CudaDriver,
                                                               node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a, b = spawn("a", G0, 2 * GiB), spawn("b", G1, 3 * GiB)

    async def go() -> None:
        m = make_manager()
        manifest = (await m.checkpoint(ref(a, b))).manifest
        # "Another node": G0 is gone, an A100 comes first, then a new H100; G1 is still here.
        node.set_gpus([fakegpu.FakeGpu(G2, A100, 40 * GiB), fakegpu.FakeGpu(G1, H100, 80 * GiB),
                       fakegpu.FakeGpu("GPU-77777777-0000-0000-0000-000000000000", H100, 80 * GiB)])
        result = await m.restore(ref(a, b), manifest)
        assert result.remapped
        assert result.pairs == (GpuPair(G0, "GPU-77777777-0000-0000-0000-000000000000"), GpuPair(G1, G1))

    run(go())
    assert node.state("a")["gpu"] == "GPU-77777777-0000-0000-0000-000000000000" and node.state("b")["gpu"] == G1
    assert [e.pairs for e in events_for(node, "restore")] == [2, 2]  # all pairs, to every process
    assert states(driver, a, b) == [CudaState.RUNNING] * 2


def test_an_explicit_gpu_map_wins(make_manager: MakeManager, node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a = spawn("a", G0, GiB)

    async def go() -> None:
        m = make_manager()
        manifest = (await m.checkpoint(ref(a))).manifest
        result = await m.restore(ref(a), manifest, {G0: G1})
        assert result.pairs == (GpuPair(G0, G1),) and result.remapped
        with pytest.raises(InvalidRequest):
            await m.restore(ref(a), manifest, {G0: "not-a-uuid"})

    run(go())
    assert node.state("a")["gpu"] == G1


def test_a_standby_override_remaps_the_next_restore_and_reports_a_refusal(make_manager: MakeManager,
                                                                         node: fakegpu.FakeNode, spawn: Spawn) -> None:
    """The standby controller's GPU pairs (gpu_override.py) reach the driver through a plain RestoreGpu, win over
    the request's map for that GPU, and a driver that refuses them leaves the process checkpointed, with its error
    reported back to the controller; without an override the same restore stays on the own GPU."""
    a = spawn("a", G0, GiB)
    key = ("k8s.io", "c1")

    async def go() -> None:
        m = make_manager()
        await m.checkpoint(ref(a))
        node.set_faults(["restore fail CUDA_ERROR_INVALID_VALUE pairs"])  # driver 580: any pairs refused
        override = m.overrides.set(key, {G0: G1})
        with pytest.raises(StepFailed):
            await m.restore(ref(a), None, {G0: G0})
        assert override.used and override.driver_error == "CUDA_ERROR_INVALID_VALUE" and "restore" in override.error
        assert node.state("a")["state"] == "CHECKPOINTED"  # nothing stranded: restorable as it was
        m.overrides.clear(key)
        result = await m.restore(ref(a))  # the fallback: its own GPU, no pairs
        assert not result.remapped
        assert node.state("a")["gpu"] == G0
        node.clear_faults()
        await m.checkpoint(ref(a))
        override = m.overrides.set(key, {G0: G1})
        result = await m.restore(ref(a), None, {G0: G0})
        assert result.pairs == (GpuPair(G0, G1),) and result.remapped and override.used and not override.error

    run(go())
    assert node.state("a")["gpu"] == G1
    assert [e.pairs for e in events_for(node, "restore")] == [1, 0, 1]


def test_restore_uses_the_remembered_manifest_when_none_is_given(make_manager: MakeManager, node: fakegpu.FakeNode,
                                                                 spawn: Spawn) -> None:
    a = spawn("a", G0, 4 * GiB)

    async def go() -> None:
        m = make_manager()
        await m.checkpoint(ref(a))
        hog = spawn("hog", G0, 78 * GiB)
        with pytest.raises(InsufficientVram):  # the pre-check still has the numbers
            await m.restore(ref(a))
        os.kill(hog, 9)
        os.waitpid(hog, 0)
        await m.restore(ref(a))

    run(go())


def test_pids_can_come_from_the_cgroup(make_manager: MakeManager, driver: CudaDriver, spawn: Spawn,
                                       freezer: Freezer) -> None:
    a, b = spawn("a"), spawn("b")
    freezer.add(a)
    freezer.add(b)
    result = run(make_manager().checkpoint(ContainerRef("k8s.io", "c1", (), str(freezer.path))))
    assert sorted(p.pid for p in result.manifest.processes) == sorted([a, b])
    assert states(driver, a, b) == [CudaState.CHECKPOINTED] * 2
    with pytest.raises(InvalidRequest):
        run(make_manager().checkpoint(ContainerRef("k8s.io", "c1")))


def test_a_process_nvml_sees_but_the_driver_cannot_checkpoint_is_refused(
        make_manager: MakeManager, node: fakegpu.FakeNode, spawn: Spawn) -> None:
    a = spawn("a", G0, 2 * GiB)
    node.set_faults([f"get_state fail CUDA_ERROR_NOT_SUPPORTED pid={a}"])
    with pytest.raises(FailedPrecondition) as info:
        run(make_manager().checkpoint(ref(a)))
    assert "would lose its GPU state" in info.value.message and "CUDA_ERROR_NOT_SUPPORTED" in info.value.message
    assert not events_for(node, "lock")


def test_plan_gpu_pairs() -> None:
    h = [NodeGpu(G0, H100, 0, 0, 80 * GiB, 80 * GiB), NodeGpu(G1, H100, 1, 1, 80 * GiB, 80 * GiB),
         NodeGpu(G2, A100, 2, 2, 40 * GiB, 40 * GiB)]
    old_a, old_b = "GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000000"
    ckpt = [GpuDeviceRecord(old_a, H100, 0, GiB), GpuDeviceRecord(G1, H100, 1, GiB)]
    # G1 stays itself; the lost GPU takes the first unused H100.
    assert plan_gpu_pairs(ckpt, h, {}) == [GpuPair(old_a, G0), GpuPair(G1, G1)]
    # An explicit map goes first, and the same-UUID rule then yields to it.
    assert plan_gpu_pairs(ckpt, h, {old_a: G1}) == [GpuPair(old_a, G1), GpuPair(G1, G0)]
    with pytest.raises(NoMatchingGpu):
        plan_gpu_pairs([GpuDeviceRecord(old_a, H100, 0, GiB), GpuDeviceRecord(old_b, H100, 1, GiB),
                        GpuDeviceRecord(G1, H100, 2, GiB)], h, {})
    with pytest.raises(NoMatchingGpu):
        plan_gpu_pairs([GpuDeviceRecord(old_a, "NVIDIA B200", 0, GiB)], h, {})
    with pytest.raises(NoMatchingGpu):
        plan_gpu_pairs(ckpt, h, {old_a: "GPU-cccccccc-0000-0000-0000-000000000000"})
    with pytest.raises(InvalidRequest):
        plan_gpu_pairs(ckpt, h, {old_a: G0, G1: G0})


def test_manifest_json_round_trip_and_version_check() -> None:
    manifest = GpuManifest("580.159.04", (GpuDeviceRecord(G0, H100, 0, 5 * GiB),),
                           (GpuProcessRecord(7, "CHECKPOINTED", (G0,), 5 * GiB),), "2026-11-23T10:00:00Z")
    text = manifest.to_json()
    assert '"format_version": 1' in text and '"kind": "kybernate.io/gpu-manifest"' in text
    assert GpuManifest.from_json(text) == manifest
    assert GpuManifest.from_dict(manifest.to_dict()) == manifest
    with pytest.raises(ManifestError, match="newer"):
        GpuManifest.from_json(text.replace('"format_version": 1', '"format_version": 2'))
    with pytest.raises(ManifestError):
        GpuManifest.from_json("[]")
    with pytest.raises(ManifestError):
        GpuManifest.from_json('{"processes": [{"state": "x"}]}')


def test_without_nvml_checkpoint_and_restore_still_work(driver: CudaDriver, node: fakegpu.FakeNode,
                                                        spawn: Spawn) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from kybernate.hooks.hookd.metrics import Metrics
    from kybernate.hooks.gpu.nvml import Nvml
    from kybernate.hooks.hookd.settings import ManagerSettings

    a = spawn("a", G0, 2 * GiB)

    async def go() -> None:
        with ThreadPoolExecutor(4) as pool:
            m = GpuManager(driver, Nvml(), ManagerSettings(), Metrics(), pool)  # never started: no NVML
            manifest = (await m.checkpoint(ref(a))).manifest
            assert [p.pid for p in manifest.processes] == [a] and manifest.gpus == ()
            assert manifest.driver_version == "cuda-13.0"
            result = await m.restore(ref(a), manifest)
            assert result.pairs == () and not result.remapped
            assert not (await m.health()).nvml

    run(go())
    assert states(driver, a) == [CudaState.RUNNING]


def test_a_missing_nvml_is_reported_once_and_clearly(tmp_path: Path) -> None:
    code = ("import logging, sys; from kybernate.hooks.api import logs; from kybernate.hooks.gpu import nvml; logs.setup('info'); "
            f"sys.exit(int(nvml.Nvml({str(tmp_path / 'libnvidia-ml.so.1')!r}).start()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "NVML unavailable: no GPU inventory, so no VRAM pre-check before restore and no automatic GPU remap" \
        in done.stderr


def test_remembered_manifests_are_bounded(make_manager: MakeManager, spawn: Spawn,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from kybernate.hooks.hookd import manager as manager_module

    monkeypatch.setattr(manager_module, "REMEMBERED_MANIFESTS", 1)
    a, b = spawn("a"), spawn("b")

    async def go() -> None:
        m = make_manager()
        await m.checkpoint(ref(a, cid="old"))
        await m.checkpoint(ref(b, cid="new"))
        assert list(m._manifests) == [("k8s.io", "new")]  # "old" was checkpointed, never restored here
        await m.restore(ref(b, cid="new"))
        assert m._manifests == {} and not m._locks

    run(go())
