"""The reconciler on the fake driver: stranded GPU state goes back where the intent says, never on a frozen
process, with backoff when VRAM is short."""

from __future__ import annotations

import subprocess
from pathlib import Path

import fakegpu
from hookd_testlib import G0, GiB, run

from kybernate.hooks.api import intent
from kybernate.hooks.hookd.manager import ContainerRef
from kybernate.hooks.hookd.metrics import Metrics
from kybernate.hooks.hookd.reconcile import Reconciler
from kybernate.hooks.hookd.reconcile_settings import ReconcileSettings


def write_intent(d: Path, cid: str, pids: list[int], desired: str = intent.RUNNING, step: str | None = None,
                 shim_pid: int = 0, manifest: dict | None = None) -> Path:
    intent.write(str(d), intent.Intent("ns", cid, "/bundle", desired, step, "unknown", shim_pid, 0, tuple(pids),
                                       manifest))
    return intent.path_of(str(d), "ns", cid)


def state(node: fakegpu.FakeNode, proc: str) -> str:
    return node.state(proc).get("state", "RUNNING").upper()


def test_stranded_gpu_state_is_restored_and_a_settled_one_left_alone(tmp_path, make_manager, node, spawn):
    a, b = spawn("a"), spawn("b")

    async def go() -> dict[str, str]:
        m = make_manager()
        await m.checkpoint(ContainerRef("ns", "a", (a,)))
        await m.checkpoint(ContainerRef("ns", "b", (b,)))
        write_intent(tmp_path, "a", [a])  # should run: stranded by a crash
        write_intent(tmp_path, "b", [b], desired=intent.PARKED, shim_pid=_a_live_shim())  # parked by a live shim
        return await Reconciler(m, ReconcileSettings(str(tmp_path), 0), Metrics()).pass_once()

    outcomes = run(go())
    assert outcomes == {"a": "restored", "b": "shim-owns"}
    assert (state(node, "a"), state(node, "b")) == ("RUNNING", "CHECKPOINTED")


def test_an_orphan_is_restored_whatever_it_wanted_but_never_while_frozen(tmp_path, make_manager, node, spawn, freezer):
    a = spawn("a")
    freezer.add(a)

    async def go() -> tuple[dict[str, str], dict[str, str]]:
        m = make_manager()
        await m.checkpoint(ContainerRef("ns", "a", (a,)))
        write_intent(tmp_path, "a", [a], desired=intent.DUMP, step="checkpoint", shim_pid=0)  # its shim died
        r = Reconciler(m, ReconcileSettings(str(tmp_path), 0), Metrics())
        freezer.freeze()
        first = await r.pass_once()
        calls_while_frozen = [e for e in node.events() if e.pid == a and e.frozen]
        assert calls_while_frozen == []
        freezer.thaw()
        r._backoff.clear()
        return first, await r.pass_once()

    assert run(go()) == ({"a": "frozen"}, {"a": "restored"})
    assert state(node, "a") == "RUNNING"


def test_short_vram_is_retried_with_backoff_and_a_dead_task_forgotten(tmp_path, make_manager, node, spawn):
    a = spawn("a", G0, 50 * GiB)

    async def go() -> list[dict[str, str]]:
        m = make_manager()
        result = await m.checkpoint(ContainerRef("ns", "a", (a,)))
        hog = node.spawn("hog", G0, 60 * GiB)
        write_intent(tmp_path, "a", [a], manifest=result.manifest.to_dict())
        write_intent(tmp_path, "gone", [999_999_9])
        r = Reconciler(m, ReconcileSettings(str(tmp_path), 5), Metrics())
        first = await r.pass_once()
        second = await r.pass_once()  # within the backoff: not tried again
        hog.kill()
        hog.wait()
        r._backoff.clear()
        return [first, second, await r.pass_once()]

    first, second, third = run(go())
    assert first == {"a": "vram-short", "gone": "removed"}
    assert second == {}
    assert third == {"a": "restored"}
    assert not intent.path_of(str(tmp_path), "ns", "gone").exists()


def _a_live_shim() -> int:
    """A live process standing in for the shim (the reconciler checks that the recorded pid lives)."""
    proc = subprocess.Popen(["containerd-shim-kybernate-v1", "30"], executable="/bin/sleep")
    _LIVE.append(proc)
    return proc.pid


_LIVE: list[subprocess.Popen[bytes]] = []


def teardown_module() -> None:
    for p in _LIVE:
        p.kill()
        p.wait()


def test_a_shim_is_known_by_its_pid_and_start_time_not_its_command_line() -> None:
    """On the H200 a shim launched through a wrapper (python -c ...) was taken for dead by its command line and
    its parked task restored behind its back; a pid reused by another process must not pass for the shim."""
    from kybernate.hooks.api import procfs
    from kybernate.hooks.hookd.reconcile import _shim_alive

    proc = subprocess.Popen(["/bin/sleep", "30"])  # any command line
    try:
        started = procfs.start_time(proc.pid)
        assert started > 0
        record = intent.Intent("ns", "c", "/bundle", intent.PARKED, None, "parked", proc.pid, shim_start=started)
        assert _shim_alive(record)
        assert not _shim_alive(intent.Intent("ns", "c", "/bundle", intent.PARKED, None, "parked", proc.pid,
                                             shim_start=started + 1))  # the pid now names another process
    finally:
        proc.kill()
        proc.wait()
    assert not _shim_alive(record)
