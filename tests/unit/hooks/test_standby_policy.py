"""Standby's pure parts: the annotations' policy, the idle tracker, the arbiter, and sock_diag on real sockets."""

from __future__ import annotations

import os
import socket

import pytest

from kybernate.hooks.hookd.daemon import parse_args
from kybernate.hooks.hookd.policy import arbiter, placement, sockwatch
from kybernate.hooks.hookd.policy.settings import Policy, PolicyError, parse_budgets, policy_of
from kybernate.hooks.hookd.policy.signals import Counters, IdleTracker, packets

GiB = 1 << 30
DEFAULTS = Policy()


# ---- policy from annotations ----

def test_no_annotations_is_the_node_default_and_parking_is_off() -> None:
    assert policy_of({"other/x": "1"}, DEFAULTS) == DEFAULTS
    assert DEFAULTS.enabled is False


def test_every_annotation_is_applied() -> None:
    p = policy_of({"kybernate.io/standby": "true", "kybernate.io/standby-idle": "5m",
                   "kybernate.io/standby-tier": "RAM", "kybernate.io/standby-wake": "api",
                   "kybernate.io/standby-priority": "700", "kybernate.io/standby-evict-busy": "true"}, DEFAULTS)
    assert p == Policy(enabled=True, idle_s=300.0, tier="ram", wake="api", priority=700, evict_busy=True)
    assert policy_of({"kybernate.io/standby-idle": "90"}, DEFAULTS).idle_s == 90.0
    assert policy_of({"kybernate.io/standby-idle": "2h"}, DEFAULTS).idle_s == 7200.0
    assert policy_of({"kybernate.io/standby-tier": "disk"}, DEFAULTS).tier == "disk"


@pytest.mark.parametrize(("key", "value", "says"), [
    ("kybernate.io/standby", "yes", "want true or false"),
    ("kybernate.io/standby-idle", "5 minutes", "want a duration"),
    ("kybernate.io/standby-idle", "0", "want 1 s to 7 days"),
    ("kybernate.io/standby-idle", "99999999", "want a duration"),
    ("kybernate.io/standby-tier", "nvme", "want ram or disk"),
    ("kybernate.io/standby-wake", "http", "want connect or api"),
    ("kybernate.io/standby-priority", "-1", "0..1000"),
    ("kybernate.io/standby-priority", "1001", "0..1000"),
    ("kybernate.io/standby-idel", "5m", "unknown"),
    ("kybernate.io/standby-wake", "x" * 100, "longer than 64 bytes"),
])
def test_a_bad_annotation_is_refused_naming_it_and_what_is_wanted(key: str, value: str, says: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_of({key: value}, DEFAULTS)
    assert says in str(err.value) and key[:40] in str(err.value)


def test_node_defaults_come_from_hookd_flags() -> None:
    s = parse_args(["--standby", "--standby-default", "on", "--standby-idle", "2m", "--standby-wake", "api",
                    "--standby-priority", "5", "--standby-gpu-budget", "GPU-abc=45Gi",
                    "--containerd-address", "/x.sock", "--standby-tier", "disk",
                    "--standby-ram-budget", "64Gi"]).standby
    assert s.enabled and s.containerd_address == "/x.sock"
    assert s.defaults == Policy(enabled=True, idle_s=120.0, tier="disk", wake="api", priority=5)
    assert s.ram_budget_bytes == 64 * GiB
    assert s.gpu_budget_bytes == {"GPU-abc": 45 * GiB}
    assert parse_args([]).standby.enabled is False


@pytest.mark.parametrize("argv", [["--standby-idle", "soon"], ["--standby-tier", "nvme"],
                                  ["--standby-ram-budget", "lots"],
                                  ["--standby-gpu-budget", "GPU-abc"], ["--standby-max-parallel-wakes", "0"],
                                  ["--standby-watch-period-s", "0"]])
def test_bad_standby_flags_stop_hookd_with_a_clear_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "--standby" in capsys.readouterr().err


def test_budgets() -> None:
    assert parse_budgets(["G1=100", "G2=2Mi"]) == {"G1": 100, "G2": 2 << 20}
    with pytest.raises(PolicyError):
        parse_budgets(["=5"])


# ---- idle tracker ----

def sample(at: float, cpu_s: float, packets: int, host: bool = False) -> Counters:
    return Counters(at=at, cpu_ns=int(cpu_s * 1e9), packets=packets, host_network=host, memory_bytes=None)


def observe(t: IdleTracker, c: Counters, gpu: int | None = 0) -> None:
    t.observe(c, gpu, cpu_idle_cores=0.05, gpu_idle_percent=1)


def test_idle_grows_while_every_signal_is_quiet() -> None:
    t = IdleTracker(last_active=0.0)
    observe(t, sample(0.0, 10.0, 100))
    observe(t, sample(10.0, 10.1, 100))  # 0.01 cores, no packets, GPU 0 %
    assert t.idle_for(10.0) == 10.0
    assert t.signals == {"cpu": "0.010 cores", "gpu": "0%", "net": "0 packets"}


@pytest.mark.parametrize(("second", "gpu", "signal"), [
    (sample(10.0, 11.0, 100), 0, "cpu"),  # 0.1 cores
    (sample(10.0, 10.0, 101), 0, "net"),
    (sample(10.0, 10.0, 100), 50, "gpu"),
    (sample(10.0, 10.0, 100, host=True), 0, "net"),  # host network: never idle by traffic
])
def test_any_active_signal_resets_idle(second: Counters, gpu: int, signal: str) -> None:
    t = IdleTracker(last_active=0.0)
    observe(t, sample(0.0, 10.0, 100))
    observe(t, second, gpu)
    assert t.idle_for(10.0) == 0.0, signal


def test_traffic_makes_it_busy_for_the_window_and_no_gpu_samples_leave_the_others_to_decide() -> None:
    t = IdleTracker(last_active=0.0)
    observe(t, sample(0.0, 0.0, 1), None)
    observe(t, sample(5.0, 0.0, 9), None)
    assert t.busy(10.0, 10.0) and not t.busy(15.0, 10.0)
    assert t.signals["gpu"] == "n/a"
    t.reset(20.0)
    assert t.idle_for(20.0) == 0.0


def test_packets_reads_the_namespace_counters() -> None:
    before = packets(os.getpid())
    assert before is not None
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as c:
        c.sendall(b"x")
    after = packets(os.getpid())
    assert after is not None and after > before


# ---- the arbiter ----

def cand(name: str, vram: int, last: float, prio: int = 0, opted: bool = True, busy: bool = False,
         evict_busy: bool = False) -> arbiter.Candidate:
    return arbiter.Candidate(name, vram * GiB, prio, last, opted, busy, evict_busy)


def test_a_wake_that_fits_parks_nothing() -> None:
    p = arbiter.plan("G", 10 * GiB, 80 * GiB, 20 * GiB, None, 0, [cand("a", 20, 1.0)])
    assert p.fits and p.victims == ()


def test_least_recently_active_first_until_it_fits() -> None:
    p = arbiter.plan("G", 30 * GiB, 80 * GiB, 5 * GiB, None, 0, [cand("new", 20, 9.0), cand("old", 20, 1.0), cand("mid", 20, 5.0)])
    assert p.fits and p.victims == ("old", "mid")
    assert "old, mid" in p.reason


def test_higher_priority_busy_and_not_opted_in_are_never_parked() -> None:
    p = arbiter.plan("G", 20 * GiB, 80 * GiB, 0, None, 5, [cand("vip", 20, 0.0, prio=6), cand("chatty", 20, 1.0, busy=True),
                                           cand("optout", 20, 2.0, opted=False), cand("ok", 20, 3.0, prio=5)])
    assert p.fits and p.victims == ("ok",)
    assert any("vip: priority 6 above 5" in s for s in p.skipped)
    assert any("chatty: recent traffic" in s for s in p.skipped)
    assert any("optout: not opted in" in s for s in p.skipped)


def test_busy_is_parked_when_its_policy_allows() -> None:
    assert arbiter.plan("G", 1, 80 * GiB, 0, None, 0, [cand("chatty", 20, 1.0, busy=True, evict_busy=True)]).victims == ("chatty",)


def test_nothing_is_parked_when_even_all_would_not_make_room() -> None:
    p = arbiter.plan("G", 50 * GiB, 80 * GiB, 0, None, 0, [cand("a", 20, 1.0), cand("b", 20, 2.0)])
    assert not p.fits and p.victims == () and "would free only 40.00 GiB" in p.reason


def test_under_a_budget_parking_counts_against_the_use_it_caps() -> None:
    # 12 GiB used of a 9 GiB budget: a 4 GiB wake needs 7 GiB parked, not 4.
    p = arbiter.plan("G", 4 * GiB, 80 * GiB, 68 * GiB, 9 * GiB, 0, [cand("a", 4, 1.0), cand("b", 4, 2.0),
                                                                    cand("c", 4, 3.0)])
    assert p.fits and p.victims == ("a", "b")
    assert not arbiter.plan("G", 4 * GiB, 80 * GiB, 68 * GiB, 9 * GiB, 0, [cand("a", 4, 1.0)]).fits


def test_the_budget_caps_what_is_free() -> None:
    assert arbiter.free_bytes(80 * GiB, 60 * GiB, None) == 60 * GiB
    assert arbiter.free_bytes(80 * GiB, 60 * GiB, 45 * GiB) == 25 * GiB  # 20 used of a 45 budget
    assert arbiter.free_bytes(80 * GiB, 10 * GiB, 45 * GiB) == 0


# ---- sock_diag ----

def test_sock_diag_sees_a_listener_and_its_pending_connections() -> None:
    diag = sockwatch.NetnsDiag(os.getpid())
    try:
        with socket.create_server(("127.0.0.1", 0), backlog=8) as srv:
            port = srv.getsockname()[1]
            assert [x.pending for x in diag.listeners() if x.port == port] == [0]
            assert [x.inode for x in diag.listeners() if x.port == port] == [os.fstat(srv.fileno()).st_ino]
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
            assert [x.pending for x in diag.listeners() if x.port == port] == [2]
            srv.accept()[0].close()
            assert [x.pending for x in diag.listeners() if x.port == port] == [1]
            for c in clients:
                c.close()
        with socket.create_server(("::1", 0), family=socket.AF_INET6) as srv6:
            assert any(x.port == srv6.getsockname()[1] and x.family == socket.AF_INET6 for x in diag.listeners())
    finally:
        diag.close()


def test_sock_diag_of_a_missing_process_says_so() -> None:
    with pytest.raises(sockwatch.SockDiagError, match="network namespace"):
        sockwatch.NetnsDiag(2**22 + 12345)


# ---- room before a start (Standby.MakeRoom): what hookd accepts ----

G0 = "GPU-00000000-0000-0000-0000-000000000000"
G1 = "GPU-11111111-1111-1111-1111-111111111111"


def _inventory():
    from kybernate.hooks.api.model import NodeGpu
    from kybernate.hooks.gpu.nvml import Inventory

    return Inventory("580.1", (NodeGpu(G0, "H100", 0, 0, 80 * GiB, 80 * GiB),
                               NodeGpu(G1, "H100", 1, 1, 80 * GiB, 80 * GiB)), ())


def test_a_start_names_its_gpus_by_uuid_index_or_all() -> None:
    from kybernate.hooks.hookd.policy.controller import _resolve_needs

    inv = _inventory()
    assert _resolve_needs(inv, {"all": 4 * GiB}) == {G0: 4 * GiB, G1: 4 * GiB}
    assert _resolve_needs(inv, {"1": 2 * GiB, G0.upper().replace("GPU-", "gpu-"): 3 * GiB}) == {G1: 2 * GiB,
                                                                                               G0: 3 * GiB}
    # A GPU this node lacks is left out: the start cannot get it anyway (the restore's own check says so).
    assert _resolve_needs(inv, {"7": GiB, "GPU-99999999-9999-9999-9999-999999999999": GiB}) == {}


@pytest.mark.parametrize(("needs", "says"), [
    ({"../etc": GiB}, "want a GPU UUID, an NVML index or all"),
    ({"0": 0}, "want 1 byte to 1 PiB"),
    ({"0": 1 << 60}, "want 1 byte to 1 PiB"),
    ({"1234": GiB}, "want a GPU UUID"),
    ({"GPU-zz": GiB}, "want a GPU UUID"),
])
def test_a_malformed_need_is_refused(needs: dict[str, int], says: str) -> None:
    from kybernate.hooks.api.errors import InvalidRequest
    from kybernate.hooks.hookd.policy.controller import _resolve_needs

    with pytest.raises(InvalidRequest, match=says):
        _resolve_needs(_inventory(), needs)


@pytest.mark.parametrize(("args", "says"), [
    (("", "c", "/run/b", {"0": GiB}, "start"), "names no container"),
    (("k8s.io", "c" * 600, "/run/b", {"0": GiB}, "start"), "names no container"),
    (("k8s.io", "c", "/run/b", {"0": GiB}, "because"), "want start or restore"),
    (("k8s.io", "c", "/run/b", {}, "start"), "want 1 to 16"),
    (("k8s.io", "c", "/run/b", {str(i): GiB for i in range(17)}, "start"), "want 1 to 16"),
    (("k8s.io", "c", "run/b", {"0": GiB}, "restore"), "absolute bundle path"),
])
def test_a_bad_make_room_request_changes_nothing_and_says_what_is_wanted(args: tuple, says: str) -> None:
    import asyncio

    from kybernate.hooks.api.errors import InvalidRequest
    from kybernate.hooks.gpu.nvml import Nvml
    from kybernate.hooks.hookd.metrics import Metrics
    from kybernate.hooks.hookd.policy.controller import Controller
    from kybernate.hooks.hookd.policy.settings import StandbySettings

    # An NVML that was never started: the request is refused before anything looks at the GPUs.
    controller = Controller(StandbySettings(enabled=True), "/nonexistent", Nvml(), Metrics())
    with pytest.raises(InvalidRequest, match=says):
        asyncio.run(controller.make_room(*args))


# ---- multiplexing across GPUs: kybernate.io/standby-gpus and the placement of a wake ----

U0 = "GPU-3ffe047a-0b03-a6b5-a359-0ecfad913d83"
U1 = "GPU-5a1b2c3d-1111-2222-3333-444455556666"
U2 = "GPU-77777777-0000-0000-0000-000000000000"


def test_standby_gpus_takes_uuids_and_indexes_in_order() -> None:
    p = policy_of({"kybernate.io/standby-gpus": f" GPU-{U1[4:].upper()} ,2, 07"}, DEFAULTS)
    assert p.gpus == (U1, "2", "7")
    assert DEFAULTS.gpus == ()


@pytest.mark.parametrize(("value", "says"), [
    ("", "want GPU UUIDs or indexes"),
    ("1,,2", "want GPU UUIDs or indexes"),
    ("GPU-xyz", "neither a GPU UUID"),
    ("256", "nor an NVML index 0..255"),
    ("-1", "neither a GPU UUID"),
    ("1,01", "listed twice"),
    (",".join(str(i) for i in range(17)), "at most 16"),
    ("1," * 600, "longer than 1024 bytes"),
])
def test_a_bad_standby_gpus_is_refused_saying_what_is_wanted(value: str, says: str) -> None:
    with pytest.raises(PolicyError) as err:
        policy_of({"kybernate.io/standby-gpus": value}, DEFAULTS)
    assert says in str(err.value) and "kybernate.io/standby-gpus" in str(err.value)


def test_allowed_gpus_are_own_first_then_the_annotation_order_on_this_node() -> None:
    index = {0: U0, 1: U1}
    assert placement.allowed_gpus(U0, ("1", U0), index) == ([U0, U1], [])
    assert placement.allowed_gpus(U1, (U0, "5", U2), index) == ([U1, U0], ["5", U2])


def room(uuid: str, free: int, *candidates: arbiter.Candidate, total: int = 80, budget: int | None = None
         ) -> placement.GpuRoom:
    return placement.GpuRoom(uuid, total * GiB, free * GiB, None if budget is None else budget * GiB, candidates)


def test_own_gpu_with_room_wins_even_when_another_has_more() -> None:
    c = placement.choose(U0, 10 * GiB, 0, [room(U0, 10), room(U1, 80)])
    assert c.gpu == U0 and c.plan.victims == () and c.reason.startswith("own GPU has room")


def test_without_room_at_home_the_first_allowed_gpu_with_room_without_parking() -> None:
    c = placement.choose(U0, 10 * GiB, 0, [room(U0, 5, cand("x", 20, 1.0)), room(U1, 5), room(U2, 30)])
    assert c.gpu == U2 and c.plan.victims == ()
    assert "own GPU has no room without parking" in c.reason and U2 in c.reason
    # A budget counts: U1 has 60 GiB free but its budget leaves 2.
    c = placement.choose(U0, 10 * GiB, 0, [room(U0, 0), room(U1, 60, budget=22), room(U2, 11)])
    assert c.gpu == U2


def test_else_the_fewest_evictions_with_the_own_gpu_preferred_on_a_tie() -> None:
    own = room(U0, 0, cand("a", 5, 1.0), cand("b", 5, 2.0))  # two parks make room at home
    other = room(U1, 0, cand("big", 10, 9.0))  # one park makes room there
    c = placement.choose(U0, 10 * GiB, 0, [own, other])
    assert c.gpu == U1 and c.plan.victims == ("big",) and "fewest evictions (1)" in c.reason
    tie = room(U1, 0, cand("c", 5, 1.0), cand("d", 5, 2.0))
    c = placement.choose(U0, 10 * GiB, 0, [own, tie])
    assert c.gpu == U0 and c.plan.victims == ("a", "b") and "own GPU" in c.reason


def test_no_room_anywhere_is_refused_with_every_gpus_reason() -> None:
    c = placement.choose(U0, 10 * GiB, 0, [room(U0, 0, cand("vip", 20, 1.0, prio=9)), room(U1, 2)])
    assert c.gpu == "" and not c.plan.fits
    assert c.reason.startswith("no allowed GPU can make room") and U0 in c.reason and U1 in c.reason
