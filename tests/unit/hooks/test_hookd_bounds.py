"""kybernate-hookd's per-request caps (issue 9, finding 5b): pids per request, request size, driver
calls per request and per node, so that one container cannot starve another."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import fakegpu
import pytest
from hookd_testlib import G0, G1, GiB, events_for, run
from test_hookd_service import serving, settings

from kybernate.hooks.api.client import HookdClient, HookdError
from kybernate.hooks.gpu.cuda import CudaDriver, CudaState
from kybernate.hooks.api.errors import RESOURCE_EXHAUSTED, TooLarge
from kybernate.hooks.hookd.manager import ContainerRef, GpuManager

MakeManager = Callable[..., GpuManager]


def most_at_once(events: list[fakegpu.Event]) -> int:
    """The largest number of these driver calls that were in flight at the same moment."""
    edges = sorted([(e.start_ns, 1) for e in events] + [(e.ns, -1) for e in events])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_300k_pids_are_refused_before_any_driver_call(make_manager: MakeManager, node: fakegpu.FakeNode) -> None:
    # Before the cap, this started 300k tasks (hookd RSS 2.6 GB) and held up other containers for 100 s.
    async def go() -> None:
        m = make_manager()
        with pytest.raises(TooLarge) as info:
            await m.checkpoint(ContainerRef("k8s.io", "many", tuple(range(1, 300_001))))
        assert info.value.code == RESOURCE_EXHAUSTED
        assert "300000 pids in one request, more than the limit of 4096" in info.value.message
        with pytest.raises(TooLarge):
            await m.restore(ContainerRef("k8s.io", "many", tuple(range(1, 4098))))

    run(go())
    assert events_for(node) == []


def test_a_cgroup_with_too_many_processes_is_refused(make_manager: MakeManager, node: fakegpu.FakeNode,
                                                    spawn: Callable[..., int], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pids = [spawn(f"p{i}", G0, GiB) for i in range(3)]
    from kybernate.hooks.api import procfs

    monkeypatch.setattr(procfs, "pids_of_cgroup", lambda path: sorted(pids))

    async def go() -> None:
        m = make_manager(max_pids_per_request=2)
        with pytest.raises(TooLarge, match="holds 3 processes, more than the limit of 2"):
            await m.checkpoint(ContainerRef("k8s.io", "c", (), "/sys/fs/cgroup/x"))

    run(go())
    assert events_for(node) == []


def test_one_container_cannot_starve_another(make_manager: MakeManager, node: fakegpu.FakeNode, driver: CudaDriver,
                                             spawn: Callable[..., int]) -> None:
    big = [spawn(f"big{i}", G0 if i % 2 else G1, GiB) for i in range(12)]
    small = spawn("small", G0, GiB)
    node.set_faults(["checkpoint delay 150"])

    async def go() -> None:
        m = make_manager(max_parallel=4, max_parallel_per_request=2)
        first = asyncio.create_task(m.checkpoint(ContainerRef("k8s.io", "big", tuple(big))))
        while not events_for(node, "lock"):  # the big container's request is under way
            await asyncio.sleep(0.005)
        await m.checkpoint(ContainerRef("k8s.io", "small", (small,)))
        assert not first.done()  # the small container did not wait for the whole big one
        await first

    run(go())
    checkpoints = events_for(node, "checkpoint")
    [small_done] = [e.ns for e in checkpoints if e.pid == small]
    big_calls = [e for e in checkpoints if e.pid in big]
    assert small_done < max(e.start_ns for e in big_calls)
    assert most_at_once(big_calls) <= 2  # per request
    assert most_at_once([e for e in events_for(node) if e.op != "get_state"]) <= 4  # per node
    assert [driver.get_state(p) for p in big + [small]] == [CudaState.CHECKPOINTED] * 13


def test_requests_over_the_size_or_pid_caps_get_resource_exhausted(tmp_path: Path, fake_driver: fakegpu.Built,
                                                                    node: fakegpu.FakeNode) -> None:
    s = settings(tmp_path, fake_driver)
    s = replace(s, server=replace(s.server, max_request_bytes=4096),
                manager=replace(s.manager, max_pids_per_request=100))

    async def go() -> None:
        async with serving(s), HookdClient(s.server.socket) as client:
            with pytest.raises(HookdError) as info:
                await client.checkpoint_gpu("k8s.io", "c1", list(range(1, 2001)), deadline_s=10)
            assert info.value.code_name == "RESOURCE_EXHAUSTED"
            with pytest.raises(HookdError) as info:
                await client.checkpoint_gpu("k8s.io", "c1", list(range(1, 102)), deadline_s=10)
            assert info.value.code_name == "RESOURCE_EXHAUSTED"
            assert "101 pids in one request, more than the limit of 100" in info.value.message
            assert (await client.health()).backend  # the daemon serves on

    run(go())
    assert events_for(node) == []


def test_the_shim_gives_up_before_containerds_deadline_and_the_checkpoint_is_put_back(
        tmp_path: Path, fake_driver: fakegpu.Built, node: fakegpu.FakeNode, spawn: Callable[..., int]) -> None:
    from kybernate.shim.hookd_driver import HookdDriver, call_deadline

    a = spawn("a", G0, GiB)
    node.set_faults(["checkpoint delay 2000"])
    s = settings(tmp_path, fake_driver)

    async def go() -> None:
        async with serving(s):
            driver = HookdDriver(s.server.socket, timeout_s=600)
            loop = asyncio.get_running_loop()
            # containerd's request timeout: 1 s from now; the hookd call gets 0.9 s of it.
            call_deadline.set(loop.time() + 1.0)
            with pytest.raises(HookdError) as info:
                await driver.checkpoint("k8s.io", "c1", [a], 1000)
            assert info.value.code_name == "DEADLINE_EXCEEDED"
            within = float(info.value.message.rsplit("within ", 1)[1].split()[0])
            assert 0.85 < within <= 0.9  # what was left of the second, less the shim's margin
            # hookd finishes the driver call it started, sees its caller gone and rolls back; the shim's
            # background restore is then a no-op (or does the rollback, whichever comes first).
            while node.state("a").get("state", "").upper() != "RUNNING" or driver._rollbacks:
                await asyncio.sleep(0.02)
            # A deadline already past: refused without calling hookd.
            call_deadline.set(loop.time() - 0.1)
            before = len(events_for(node))
            with pytest.raises(HookdError, match="no time left for the GPU checkpoint"):
                await driver.checkpoint("k8s.io", "c1", [a], 1000)
            assert len(events_for(node)) == before
            await driver._client.close()

    run(go())
    assert [e.op for e in events_for(node) if e.op != "get_state"] == ["lock", "checkpoint", "restore", "unlock"]


def test_a_new_connection_to_a_stopped_daemon_fails_within_the_keepalive_bound(
        tmp_path: Path, fake_driver: fakegpu.Built, node: fakegpu.FakeNode, spawn: Callable[..., int]) -> None:
    """The socket is there and the kernel accepts the connection, but nobody answers: a first call from
    a new shim must not wait for its 600 s deadline."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from kybernate.hooks.api.client import KEEPALIVE_S, HookdUnavailable

    a = spawn("a", G0, GiB)
    sock = tmp_path / "hookd.sock"
    env = {**os.environ, "LD_LIBRARY_PATH": str(fake_driver.dir), "FAKEGPU_STATE_DIR": str(node.dir)}
    proc = subprocess.Popen([sys.executable, "-m", "kybernate.hooks.hookd.daemon", "--socket", str(sock), "--libcuda",
                             str(fake_driver.libcuda), "--metrics-address", ""], env=env, stderr=subprocess.DEVNULL)
    try:
        while not sock.exists():
            assert proc.poll() is None, "hookd exited"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)

        async def go() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with HookdClient(str(sock)) as client:
                with pytest.raises(HookdUnavailable):
                    await client.checkpoint_gpu("k8s.io", "c1", [a], deadline_s=600)
            return loop.time() - started

        took = run(go())
        print(f"first call to a stopped hookd failed after {took:.1f} s")
        assert took < 4 * KEEPALIVE_S  # against the 600 s deadline it would otherwise wait
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
    assert [e.op for e in events_for(node) if e.op != "get_state"] == []  # the request never reached the driver


def test_overlong_names_are_refused(make_manager: MakeManager, node: fakegpu.FakeNode) -> None:
    from kybernate.hooks.api.errors import InvalidRequest

    async def go() -> None:
        m = make_manager()
        with pytest.raises(InvalidRequest, match="container_id is 1000 bytes, more than the limit of 256"):
            await m.checkpoint(ContainerRef("k8s.io", "c" * 1000, (1,)))
        with pytest.raises(InvalidRequest, match="cgroup_path is 5000 bytes, more than the limit of 4096"):
            await m.checkpoint(ContainerRef("k8s.io", "c", (), "/" * 5000))

    run(go())
    assert events_for(node) == []


def test_the_caps_are_flags_of_the_daemon() -> None:
    from kybernate.hooks.hookd.daemon import parse_args

    s = parse_args(["--max-parallel", "8", "--max-parallel-per-request", "4", "--max-pids-per-request", "100",
                    "--max-request-bytes", "65536"])
    assert (s.manager.max_parallel, s.manager.max_parallel_per_request, s.manager.max_pids_per_request,
            s.server.max_request_bytes) == (8, 4, 100, 65536)
    defaults = parse_args([])
    assert (defaults.manager.max_parallel_per_request, defaults.manager.max_pids_per_request,
            defaults.server.max_request_bytes) == (16, 4096, 1 << 20)
    with pytest.raises(SystemExit):
        parse_args(["--max-pids-per-request", "0"])


def test_a_restore_with_no_time_left_still_happens_in_the_background(
        tmp_path: Path, fake_driver: fakegpu.Built, node: fakegpu.FakeNode, spawn: Callable[..., int]) -> None:
    """After a failed pause the GPU must come back even when containerd's deadline has passed."""
    from kybernate.shim.hookd_driver import HookdDriver, call_deadline

    a = spawn("a", G0, GiB)
    s = settings(tmp_path, fake_driver)

    async def go() -> None:
        async with serving(s):
            driver = HookdDriver(s.server.socket, timeout_s=600)
            manifest = await driver.checkpoint("k8s.io", "c1", [a], 1000)
            assert node.state("a").get("state", "").upper() == "CHECKPOINTED"
            call_deadline.set(asyncio.get_running_loop().time() - 0.1)
            with pytest.raises(HookdError, match="no time left for the GPU restore"):
                await driver.restore("k8s.io", "c1", [a], manifest)
            while driver._rollbacks:
                await asyncio.wait(set(driver._rollbacks.values()))
            assert node.state("a").get("state", "").upper() == "RUNNING"
            await driver._client.close()

    run(go())


def test_a_driver_call_that_overruns_keeps_its_slot_until_it_returns(make_manager: MakeManager,
                                                                     node: fakegpu.FakeNode,
                                                                     spawn: Callable[..., int]) -> None:
    a, b = spawn("a"), spawn("b")
    node.set_faults(["lock stall 1000 proc=a"])

    async def go() -> None:
        m = make_manager(lock_grace_s=0.1, max_parallel=1)
        with pytest.raises(Exception):
            await m.checkpoint(ContainerRef("k8s.io", "ca", (a,)), lock_timeout_ms=100)
        assert m._node_slots.locked()  # the late lock still runs in its thread
        await m.checkpoint(ContainerRef("k8s.io", "cb", (b,)))  # waits for that slot, then gets it
        await m.wait_settled()
        assert not m._node_slots.locked()

    run(go())
    lock_a = [e for e in events_for(node, "lock") if e.pid == a][0]
    [checkpoint_b] = events_for(node, "checkpoint")
    assert checkpoint_b.start_ns >= lock_a.ns  # b's driver calls waited for a's late lock to return
