import asyncio
import json

import pytest

from kybernate.hooks.api.model import GpuManifest, GpuProcessRecord
from kybernate.shim import gpu_steps
from kybernate.hooks.api import intent
from kybernate.shim.errors import InvalidArgument
from kybernate.shim.gpu_steps import ALL_KEYS, TABLE, Action, Event, GpuStepError, GpuSteps, Phase, Reject, Step
from kybernate.shim.runtime_options import KybernateOptions
from kybernate.shim.taskspec import TaskSpec, is_gpu_container, options_with_annotations


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({}, False),
        ({"linux": {"devices": [{"path": "/dev/nvidia0"}]}}, True),
        ({"linux": {"devices": [{"path": "/dev/fuse"}]}}, False),
        ({"process": {"env": ["NVIDIA_VISIBLE_DEVICES=all"]}}, True),
        ({"process": {"env": ["NVIDIA_VISIBLE_DEVICES=void"]}}, False),
        ({"annotations": {"kybernate.io/gpu": "true"}}, True),
        ({"annotations": {"kybernate.io/gpu": "false"}, "process": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]}}, False),
    ],
)
def test_gpu_containers_are_recognised_from_the_spec(spec, expected):
    assert is_gpu_container(spec) is expected


def test_task_spec_is_parsed_once_with_annotation_overrides():
    spec = {"annotations": {"kybernate.io/lock-timeout-ms": "2500", "kybernate.io/pause-releases-vram": "false",
                            "kybernate.io/gpu": "true", "io.kubernetes.cri.container-name": "trainer"}}
    got = TaskSpec.parse("c1", "ns", "/b", spec, KybernateOptions())
    assert got.options == KybernateOptions(lock_timeout_ms=2500, pause_releases_vram=False)
    assert (got.gpu, got.restore_from, got.container_name) == (True, None, "trainer")


@pytest.mark.parametrize(
    "notes, message",
    [
        ({"kybernate.io/lock-timeout-ms": "soon"}, "lock-timeout-ms='soon'"),
        ({"kybernate.io/lock-timeout-ms": "0"}, "1..3600000"),
        ({"kybernate.io/pause-releases-vram": "yes"}, "want true or false"),
    ],
)
def test_bad_annotations_are_refused_as_invalid_argument(notes, message):
    with pytest.raises(InvalidArgument, match=message):
        options_with_annotations(KybernateOptions(), notes)


def test_manifest_round_trip_and_bad_manifests_are_invalid_arguments(tmp_path):
    assert gpu_steps.read_manifest(str(tmp_path)) is None
    manifest = GpuManifest(processes=(GpuProcessRecord(pid=1, state="CHECKPOINTED"),))
    gpu_steps.write_manifest(str(tmp_path), manifest)
    assert gpu_steps.read_manifest(str(tmp_path)) == manifest
    assert not list(tmp_path.glob("*.tmp"))
    for bad in ("{nope", json.dumps([1]), json.dumps({"processes": [{"pid": "one"}]})):
        (tmp_path / "kybernate.json").write_text(bad)
        with pytest.raises(InvalidArgument, match="malformed"):
            gpu_steps.read_manifest(str(tmp_path))


# --- the lifecycle table ------------------------------------------------------------------------


def test_every_phase_event_and_guard_has_a_rule():
    assert set(TABLE) == set(ALL_KEYS)
    assert all(isinstance(r, (Step, Reject)) for r in TABLE.values())


@pytest.mark.parametrize("key", ALL_KEYS, ids=lambda k: "-".join(str(getattr(x, "value", x)) for x in k))
def test_each_rule_keeps_the_invariants(key):
    phase, event, paused, release = key
    found = TABLE[key]
    if isinstance(found, Reject):
        assert found.why
        return
    # Nothing ever touches the GPU of a container that has none, and NO_GPU is never entered otherwise.
    assert (phase is Phase.NO_GPU) == (found.next is Phase.NO_GPU)
    if phase is Phase.NO_GPU:
        assert found.action is Action.NOTHING
    # The driver is never called on a frozen process: a frozen task is thawed first, or nothing happens.
    if paused:
        assert found.action in (Action.NOTHING, Action.THAW_CHECKPOINT_FREEZE)
    else:
        assert found.action is not Action.THAW_CHECKPOINT_FREEZE
    # A checkpoint leaves the GPU in host memory, a restore puts it back on the GPU.
    if found.action in (Action.CHECKPOINT, Action.THAW_CHECKPOINT_FREEZE):
        assert found.next in (Phase.PARKED, Phase.DUMPING)
    if found.action is Action.RESTORE:
        assert found.next is Phase.LIVE
    # A plain pause that keeps VRAM never moves it.
    if event is Event.PAUSE and not release and phase is Phase.LIVE:
        assert found.action is Action.NOTHING
    # A task whose dump ended and that is not paused gets its GPU back.
    if phase is Phase.DUMPING and event in (Event.CHECKPOINT_DONE, Event.CHECKPOINT_FAILED):
        assert found.action is (Action.NOTHING if paused else Action.RESTORE)


def test_unknown_phase_always_has_a_way_back_to_a_known_state():
    for event in (Event.RESUME, Event.RECONCILE, Event.PAUSE_FAILED):
        found = TABLE[(Phase.UNKNOWN, event, False, True)]
        assert isinstance(found, Step) and found.action is Action.RESTORE and found.next is Phase.LIVE


# --- GpuSteps with a driver that records calls ----------------------------------------------------


class Driver:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: str | None = None

    async def checkpoint(self, namespace, container_id, pids, lock_timeout_ms):
        self.calls.append("checkpoint")
        if self.fail == "checkpoint":
            raise ConnectionError("hookd went away")
        return GpuManifest(processes=tuple(GpuProcessRecord(pid=p, state="CHECKPOINTED") for p in pids))

    async def restore(self, namespace, container_id, pids, manifest, targets=None):
        self.calls.append("restore")
        if self.fail == "restore":
            raise ConnectionError("hookd went away")


def make_steps(tmp_path, driver, phase=Phase.LIVE):
    frozen: list[str] = []

    async def pids(_):
        return [42]

    async def freeze(_):
        frozen.append("freeze")

    async def thaw(_):
        frozen.append("thaw")

    steps = GpuSteps(gpu_steps.TaskControl(pids, freeze, thaw), lambda _: driver)
    options = KybernateOptions(intent_dir=str(tmp_path))
    spec = TaskSpec("c1", "ns", "/bundle", True, options, None, None)
    asyncio.run(steps.created(gpu_steps.TaskGpu(spec, phase)))
    return steps, frozen


def read_intent(tmp_path):
    return intent.read(intent.path_of(str(tmp_path), "ns", "c1"))


def test_steps_record_intent_and_a_failed_step_is_settled_by_the_next_event(tmp_path):
    driver = Driver()
    steps, _ = make_steps(tmp_path, driver)
    assert read_intent(tmp_path).desired == intent.RUNNING
    driver.fail = "checkpoint"
    with pytest.raises(ConnectionError):
        asyncio.run(steps.on(Event.PAUSE, "c1"))
    record = read_intent(tmp_path)
    assert (steps.phase("c1"), record.desired, record.step, record.phase) == (Phase.UNKNOWN, "running", None, "unknown")
    driver.fail = None
    asyncio.run(steps.on(Event.RECONCILE, "c1"))  # containerd reconnected: restore, idempotent in hookd
    assert steps.phase("c1") is Phase.LIVE and driver.calls == ["checkpoint", "restore"]
    asyncio.run(steps.on(Event.PAUSE, "c1"))
    record = read_intent(tmp_path)
    parked = GpuManifest(processes=(GpuProcessRecord(pid=42, state="CHECKPOINTED"),))
    assert (record.desired, record.pids, record.manifest) == ("parked", (42,), parked.to_dict())
    asyncio.run(steps.forget("c1"))
    assert not intent.path_of(str(tmp_path), "ns", "c1").exists()


def test_a_request_that_never_reached_hookd_leaves_the_phase_as_it_was(tmp_path):
    from kybernate.hooks.api.client import HookdUnavailable

    class Down(Driver):
        async def checkpoint(self, namespace, container_id, pids, lock_timeout_ms):
            raise HookdUnavailable("/nowhere.sock", "no socket")

    steps, _ = make_steps(tmp_path, Down())
    with pytest.raises(HookdUnavailable):
        asyncio.run(steps.on(Event.PAUSE, "c1"))
    assert steps.phase("c1") is Phase.LIVE and read_intent(tmp_path).desired == intent.RUNNING


def test_checkpoint_of_a_paused_task_thaws_first_and_freezes_again(tmp_path):
    driver = Driver()
    steps, frozen = make_steps(tmp_path, driver)
    steps.tasks["c1"].paused = True
    asyncio.run(steps.on(Event.CHECKPOINT, "c1"))
    assert frozen == ["thaw", "freeze"] and steps.phase("c1") is Phase.DUMPING
    asyncio.run(steps.on(Event.CHECKPOINT_DONE, "c1"))  # still paused: parked until Resume
    assert steps.phase("c1") is Phase.PARKED and driver.calls == ["checkpoint"]


def test_a_rejected_event_changes_nothing(tmp_path):
    steps, _ = make_steps(tmp_path, Driver(), phase=Phase.RESTORE_PENDING)
    with pytest.raises(GpuStepError, match="has not been started"):
        asyncio.run(steps.on(Event.PAUSE, "c1"))
    assert steps.phase("c1") is Phase.RESTORE_PENDING


def test_no_intent_directory_means_no_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    driver = Driver()
    steps = GpuSteps(gpu_steps.TaskControl(None, None, None), lambda _: driver)  # type: ignore[arg-type]
    spec = TaskSpec("c1", "ns", "/b", True, KybernateOptions(intent_dir=str(blocker)), None, None)
    with pytest.raises(GpuStepError, match="cannot record the GPU intent"):
        asyncio.run(steps.created(gpu_steps.TaskGpu(spec, Phase.LIVE)))
    assert driver.calls == []
