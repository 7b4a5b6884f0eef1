"""The shim's own store checkpoints (shim/resilience.py) against a scripted hookd: checkpoint-on-stop, its
budget, SIGKILL, periodic checkpoints (one at a time, skipped while paused), retention. Every wait is on an
event the fake sets, never a sleep."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from kybernate.api import task_pb2
from kybernate.hooks.api.client import HookdError, HookdUnavailable
from kybernate.hooks.api.model import StoreCheckpointResult
from kybernate.hooks.api.store import Identity, Store, StoreError
from kybernate.shim.resilience import StoreCheckpoints, retain
from kybernate.shim.runtime_options import KybernateOptions
from kybernate.shim.taskspec import Resilience, TaskSpec

SIGTERM, SIGINT, SIGKILL = 15, 2, 9


@dataclass
class Call:
    container_id: str
    key: str
    leave_running: bool
    deadline_s: float
    reason: str
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False


class FakeHookd:
    """Store.Checkpoint as a script: each call waits for its `release` (or answers at once when `block` is
    off), then returns a result or raises `fail`."""

    def __init__(self, block: bool = False, fail: Exception | None = None) -> None:
        self.block = block
        self.fail = fail
        self.calls: list[Call] = []
        self.arrived = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0

    async def store_checkpoint(self, namespace: str, container_id: str, key: str = "", *, leave_running: bool = False,
                               deadline_s: float = 3600.0, reason: str = "cli",
                               on_progress: Callable[..., None] | None = None) -> StoreCheckpointResult:
        call = Call(container_id, key, leave_running, deadline_s, reason)
        self.calls.append(call)
        self.arrived.set()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.block:
                await call.release.wait()
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        finally:
            self.in_flight -= 1
        if self.fail is not None:
            raise self.fail
        return StoreCheckpointResult(key=key, generation=len(self.calls), path=f"/store/{key}/{len(self.calls)}",
                                     size_bytes=1, pause_s=0.25, total_s=0.5, phase_s={}, upload_queued=False)

    async def next_call(self, count: int) -> Call:
        while len(self.calls) < count:
            self.arrived.clear()
            await self.arrived.wait()
        return self.calls[count - 1]


@dataclass
class Harness:
    hookd: FakeHookd
    paused: set[str] = field(default_factory=set)
    status: int = task_pb2.RUNNING
    retained: list[tuple[int, int]] = field(default_factory=list)
    paused_asked: asyncio.Event = field(default_factory=asyncio.Event)

    def make(self) -> StoreCheckpoints:
        async def status(cid: str) -> int:
            return self.status

        def paused(cid: str) -> bool:
            self.paused_asked.set()
            return cid in self.paused

        async def keep(result: StoreCheckpointResult, n: int) -> None:
            self.retained.append((result.generation, n))

        return StoreCheckpoints(status=status, paused=paused, retain=keep, client_for=lambda options: self.hookd)


def spec(**want: Any) -> TaskSpec:
    base: dict[str, Any] = {"key": "ml_train-0_main", "on_stop": True, "on_stop_timeout_s": 30.0,
                            "stop_signal": SIGTERM, "every_s": None, "keep": 3, "resume_latest": False}
    return TaskSpec(container_id="c1", namespace="k8s.io", bundle="/b", gpu=False, options=KybernateOptions(),
                    restore_from=None, container_name="main", resilience=Resilience(**{**base, **want}))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_stop_signal_checkpoints_into_the_store_and_is_not_forwarded() -> None:
    async def go() -> None:
        h = Harness(FakeHookd())
        store = h.make()
        store.created(spec())
        assert await store.on_stop_signal("c1", SIGTERM, None) is True
        (call,) = h.hookd.calls
        assert (call.key, call.leave_running, call.reason) == ("ml_train-0_main", False, "stop")
        assert 0 < call.deadline_s < 30.0  # hookd's deadline ends before the shim's budget
        assert h.retained == [(1, 3)]
    run(go())


@pytest.mark.parametrize("signal", [SIGINT, 10, 1])
def test_other_signals_are_forwarded_untouched(signal: int) -> None:
    async def go() -> None:
        h = Harness(FakeHookd())
        store = h.make()
        store.created(spec())
        assert await store.on_stop_signal("c1", signal, None) is False
        assert h.hookd.calls == []
    run(go())


def test_a_named_stop_signal_is_the_one_held() -> None:
    async def go() -> None:
        h = Harness(FakeHookd())
        store = h.make()
        store.created(spec(stop_signal=SIGINT))
        assert await store.on_stop_signal("c1", SIGTERM, None) is False
        assert await store.on_stop_signal("c1", SIGINT, None) is True
    run(go())


def test_without_checkpoint_on_stop_nothing_is_held() -> None:
    async def go() -> None:
        h = Harness(FakeHookd())
        store = h.make()
        store.created(spec(on_stop=False, every_s=60.0))
        assert await store.on_stop_signal("c1", SIGTERM, None) is False
        assert h.hookd.calls == []
    run(go())


@pytest.mark.parametrize("error", [HookdError(9, "the task is not running"), HookdError(4, "deadline"),
                                   HookdUnavailable("/run/kybernate/hookd.sock", "no socket")])
def test_a_failed_checkpoint_lets_the_stop_go_on(error: Exception) -> None:
    async def go() -> None:
        h = Harness(FakeHookd(fail=error))
        store = h.make()
        store.created(spec())
        assert await store.on_stop_signal("c1", SIGTERM, None) is False
        assert h.retained == []
    run(go())


def test_a_checkpoint_past_its_budget_is_abandoned_and_the_stop_goes_on() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(block=True))  # never answers
        store = h.make()
        store.created(spec(on_stop_timeout_s=0.05))
        assert await store.on_stop_signal("c1", SIGTERM, None) is False
        (call,) = h.hookd.calls
        assert call.cancelled
        assert call.deadline_s < 0.05
    run(go())


def test_containerds_deadline_shortens_the_budget() -> None:
    async def go() -> None:
        h = Harness(FakeHookd())
        store = h.make()
        store.created(spec(on_stop_timeout_s=600.0))
        deadline = asyncio.get_running_loop().time() + 10.0
        assert await store.on_stop_signal("c1", SIGTERM, deadline) is True
        assert h.hookd.calls[0].deadline_s < 10.0
    run(go())


def test_no_time_left_before_containerds_deadline_forwards_at_once() -> None:
    async def go() -> None:
        h = Harness(FakeHookd())
        store = h.make()
        store.created(spec())
        assert await store.on_stop_signal("c1", SIGTERM, asyncio.get_running_loop().time() - 1) is False
        assert h.hookd.calls == []
    run(go())


def test_sigkill_cancels_the_checkpoint_in_flight() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(block=True))
        store = h.make()
        store.created(spec())
        stopping = asyncio.create_task(store.on_stop_signal("c1", SIGTERM, None))
        call = await h.hookd.next_call(1)
        store.killed("c1")
        assert await stopping is True  # the stop signal is moot: the task is being killed
        assert call.cancelled
        assert h.retained == []
    run(go())


def test_a_sigkill_after_the_dump_ended_the_task_waits_for_the_commit() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(block=True))
        store = h.make()
        store.created(spec())
        stopping = asyncio.create_task(store.on_stop_signal("c1", SIGTERM, None))
        call = await h.hookd.next_call(1)
        store.dumped("c1")  # the shim's Checkpoint ended the task through the dump
        assert await stopping is True  # answered at once: containerd deletes the exited task next
        store.killed("c1")  # containerd kills what is left of the exited task
        store.forget("c1")  # and deletes it
        assert not call.cancelled
        call.release.set()
        await asyncio.gather(*store._stops)  # the commit is still waited for, then retention
        assert h.retained == [(1, 3)]
    run(go())


def test_a_second_stop_signal_waits_for_the_same_checkpoint() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(block=True))
        store = h.make()
        store.created(spec())
        first = asyncio.create_task(store.on_stop_signal("c1", SIGTERM, None))
        call = await h.hookd.next_call(1)
        second = asyncio.create_task(store.on_stop_signal("c1", SIGTERM, None))
        call.release.set()
        assert (await first, await second) == (True, True)
        assert len(h.hookd.calls) == 1
    run(go())


def test_a_paused_task_is_not_checkpointed_on_stop() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(), paused={"c1"})
        store = h.make()
        store.created(spec())
        assert await store.on_stop_signal("c1", SIGTERM, None) is False
        assert h.hookd.calls == []
    run(go())


def test_periodic_checkpoints_leave_the_task_running_one_at_a_time() -> None:
    async def go() -> None:
        h = Harness(FakeHookd())
        store = h.make()
        store.created(spec(on_stop=False, every_s=0.001, keep=2))
        store.started("c1")
        await h.hookd.next_call(3)
        store.forget("c1")
        assert all((c.leave_running, c.reason, c.key) == (True, "periodic", "ml_train-0_main") for c in h.hookd.calls)
        assert h.hookd.most_in_flight == 1
        assert h.retained[:3] == [(1, 2), (2, 2), (3, 2)]
    run(go())


def test_periodic_checkpoints_are_skipped_while_paused() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(), paused={"c1"})
        store = h.make()
        store.created(spec(on_stop=False, every_s=0.001))
        store.started("c1")
        for _ in range(3):  # three periods found the task paused
            h.paused_asked.clear()
            await h.paused_asked.wait()
        assert h.hookd.calls == []
        h.paused.clear()
        await h.hookd.next_call(1)
        store.forget("c1")
    run(go())


def test_periodic_checkpoints_end_when_the_task_exited() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(), status=task_pb2.STOPPED)
        store = h.make()
        store.created(spec(on_stop=False, every_s=0.001))
        store.started("c1")
        periodic = store._tasks["c1"].periodic
        assert periodic is not None
        await periodic
        assert h.hookd.calls == []
    run(go())


def test_a_failed_periodic_checkpoint_is_retried_next_period() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(fail=HookdError(10, "busy")))
        store = h.make()
        store.created(spec(on_stop=False, every_s=0.001))
        store.started("c1")
        await h.hookd.next_call(2)
        store.forget("c1")
    run(go())


def test_stop_waits_for_the_periodic_checkpoint_in_flight_and_none_starts_after() -> None:
    async def go() -> None:
        h = Harness(FakeHookd(block=True))
        store = h.make()
        store.created(spec(every_s=0.001))
        store.started("c1")
        periodic = await h.hookd.next_call(1)
        stopping = asyncio.create_task(store.on_stop_signal("c1", SIGTERM, None))
        await asyncio.sleep(0)  # let the stop reach the lock
        assert len(h.hookd.calls) == 1  # the stop checkpoint waits for the periodic one
        periodic.release.set()
        stop = await h.hookd.next_call(2)
        assert stop.reason == "stop"
        stop.release.set()
        assert await stopping is True
        assert h.hookd.most_in_flight == 1
        task = store._tasks["c1"].periodic
        assert task is not None
        await task  # the periodic loop ended: the task is stopping
        assert [c.reason for c in h.hookd.calls] == ["periodic", "stop"]
    run(go())


def test_unregistered_or_sandbox_tasks_are_left_alone() -> None:
    async def go() -> None:
        h = Harness(FakeHookd())
        store = h.make()
        assert await store.on_stop_signal("other", SIGTERM, None) is False
        store.killed("other")
        store.started("other")
        store.forget("other")
    run(go())


def _generation(store: Store, key: str) -> str:
    pending = store.begin(key)
    with open(os.path.join(pending.temp, "f"), "w") as f:
        f.write("x")
    return pending.commit(Identity(container_id="c")).path


def test_retain_keeps_the_newest_generations_of_the_key(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from kybernate.hooks.api.store_registry import Registry

    monkeypatch.setenv("KYBERNATE_REGISTRY", str(tmp_path / "registry.db"))
    store = Store(str(tmp_path / "store"))
    paths = [_generation(store, "k") for _ in range(5)]
    _generation(store, "other")
    registry = Registry(str(tmp_path / "registry.db"))
    registry.rebuild(store)
    assert retain(paths[-1], "k", 2) == [1, 2, 3]
    assert store.generations("k") == [4, 5]
    assert store.generations("other") == [1]
    assert not [n for n in os.listdir(store.key_dir("k")) if n.startswith(".tmp-")]
    assert [(r.key, r.generation) for r in registry.rows()] == [("k", 4), ("k", 5), ("other", 1)]
    assert retain(paths[-1], "k", 0) == [4]  # never below one: the newest stays


def test_the_key_lock_is_exclusive_and_bounded(tmp_path: Any) -> None:
    store = Store(str(tmp_path))
    with store.lock("k"):
        with pytest.raises(StoreError, match="held its lock"):
            with store.lock("k", wait_s=0.0):
                pass
    with store.lock("k", wait_s=0.0):  # released with its holder
        pass
    assert store.keys() == [] and store.generations("k") == []  # a lock is not a key
