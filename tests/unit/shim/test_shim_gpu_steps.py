import json

import pytest

from kybernate.hooks.api.model import GpuManifest, GpuProcessRecord
from kybernate.shim import gpu_steps
from kybernate.shim.gpu_steps import GpuStepError, Phase, Event, TRANSITIONS
from kybernate.shim.runtime_options import KybernateOptions


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
    assert gpu_steps.is_gpu_container(spec) is expected


def test_annotations_override_options():
    spec = {"annotations": {"kybernate.io/lock-timeout-ms": "2500", "kybernate.io/pause-releases-vram": "false"}}
    got = gpu_steps.options_with_annotations(KybernateOptions(), spec)
    assert got == KybernateOptions(lock_timeout_ms=2500, pause_releases_vram=False)


@pytest.mark.parametrize(
    "notes, message",
    [
        ({"kybernate.io/lock-timeout-ms": "soon"}, "lock-timeout-ms='soon'"),
        ({"kybernate.io/lock-timeout-ms": "0"}, "1..3600000"),
        ({"kybernate.io/pause-releases-vram": "yes"}, "want true or false"),
    ],
)
def test_bad_annotations_are_refused(notes, message):
    with pytest.raises(GpuStepError, match=message):
        gpu_steps.options_with_annotations(KybernateOptions(), {"annotations": notes})


def test_manifest_round_trip_and_bad_manifest(tmp_path):
    assert gpu_steps.read_manifest(str(tmp_path)) is None
    manifest = GpuManifest(processes=(GpuProcessRecord(pid=1, state="CHECKPOINTED"),))
    gpu_steps.write_manifest(str(tmp_path), manifest)
    assert gpu_steps.read_manifest(str(tmp_path)) == manifest
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "kybernate.json").write_text("{nope")
    with pytest.raises(GpuStepError, match="not valid JSON"):
        gpu_steps.read_manifest(str(tmp_path))
    (tmp_path / "kybernate.json").write_text(json.dumps([1]))
    with pytest.raises(GpuStepError, match="not a JSON object"):
        gpu_steps.read_manifest(str(tmp_path))


def test_transition_table_orders_gpu_steps_around_the_freeze():
    # The lock must come before the freeze: pausing a live GPU task checkpoints it first.
    assert TRANSITIONS[(Phase.LIVE, Event.PAUSE)] == "checkpoint_gpu"
    # GPU state only returns once the task runs again.
    assert TRANSITIONS[(Phase.CHECKPOINTED, Event.RESUME)] == "restore_gpu"
    assert TRANSITIONS[(Phase.RESTORE_PENDING, Event.START)] == "restore_gpu"
    # Nothing ever touches the GPU of a container that has none.
    assert not [key for key in TRANSITIONS if key[0] is Phase.NO_GPU]
