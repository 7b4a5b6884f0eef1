"""What a GPU task asks of hookd's standby arbiter before its Start (shim/vram_room.py), and the annotation."""

import asyncio

import pytest

from kybernate.hooks.api.client import HookdError, HookdUnavailable
from kybernate.hooks.api.model import GpuDeviceRecord, GpuManifest
from kybernate.shim import vram_room
from kybernate.shim.errors import InvalidArgument
from kybernate.shim.gpu_steps import Phase, TaskGpu
from kybernate.shim.runtime_options import KybernateOptions
from kybernate.shim.taskspec import TaskSpec

G0 = "GPU-00000000-0000-0000-0000-000000000000"
G1 = "GPU-11111111-1111-1111-1111-111111111111"
GiB = 1 << 30


def spec(notes=None, env=("NVIDIA_VISIBLE_DEVICES=all",)):
    return TaskSpec.parse("c1", "k8s.io", "/run/b", {"annotations": dict(notes or {}), "process": {"env": list(env)}},
                          KybernateOptions())


@pytest.mark.parametrize("raw, expected", [("20Gi", 20 * GiB), ("512Mi", 512 << 20), ("1048576", 1 << 20),
                                           (" 3Gi ", 3 * GiB)])
def test_vram_request_is_parsed_to_bytes(raw, expected):
    assert spec({"kybernate.io/vram-request": raw}).vram_request == expected


@pytest.mark.parametrize("raw", ["0", "0Gi", "lots", "20GB", "-1Gi", "1.5Gi", "Gi", "2000000Gi", "9" * 17,
                                 "２Gi"])
def test_a_bad_vram_request_fails_the_create_naming_the_annotation(raw):
    with pytest.raises(InvalidArgument, match="vram-request"):
        spec({"kybernate.io/vram-request": raw})


def test_a_container_without_gpus_ignores_the_annotation():
    assert spec({"kybernate.io/vram-request": "4Gi"}, env=()).vram_request == 0


def task(phase=Phase.LIVE, notes=None, env=("NVIDIA_VISIBLE_DEVICES=all",), manifest=None):
    return TaskGpu(spec(notes, env), phase, manifest=manifest)


def test_a_new_task_asks_for_its_request_on_each_of_its_gpus():
    room = vram_room.request_for(task(notes={"kybernate.io/vram-request": "4Gi"},
                                      env=(f"NVIDIA_VISIBLE_DEVICES=0,{G1}",)))
    assert room == vram_room.RoomRequest({"0": 4 * GiB, G1: 4 * GiB}, "start")
    # NVIDIA_VISIBLE_DEVICES=all (or unset): every GPU of the node, as the container gets them.
    assert vram_room.request_for(task(notes={"kybernate.io/vram-request": "4Gi"})) == vram_room.RoomRequest(
        {"all": 4 * GiB}, "start")


def test_a_restore_asks_for_what_its_checkpoint_held_and_a_task_that_says_nothing_asks_nothing():
    manifest = GpuManifest(gpus=(GpuDeviceRecord(G0, "H100", 0, 3 * GiB), GpuDeviceRecord(G1, "H100", 1, 0)))
    assert vram_room.request_for(task(Phase.RESTORE_PENDING, manifest=manifest)) == vram_room.RoomRequest(
        {G0: 3 * GiB}, "restore")
    assert vram_room.request_for(task(Phase.RESTORE_PENDING, manifest=GpuManifest())) is None
    assert vram_room.request_for(task()) is None
    # A restore's need is its manifest's, whatever the annotation says.
    assert vram_room.request_for(task(Phase.RESTORE_PENDING, {"kybernate.io/vram-request": "9Gi"},
                                      manifest=manifest)).needs == {G0: 3 * GiB}


class Driver:
    def __init__(self, error=None):
        self.error = error
        self.calls = []

    async def make_room(self, namespace, container_id, bundle, request, manifest, targets):
        self.calls.append((namespace, container_id, bundle, request))
        if self.error is not None:
            raise self.error


def test_no_arbiter_lets_the_task_start_and_an_arbiter_refusal_fails_it():
    t = task(notes={"kybernate.io/vram-request": "4Gi"})
    asyncio.run(vram_room.make_room(t, Driver(HookdUnavailable("/run/h.sock", "runs without --standby"))))
    refused = Driver(HookdError(9, "no room on GPU-0: needs 4.00 GiB, 0.00 GiB free"))
    with pytest.raises(HookdError, match="no room"):
        asyncio.run(vram_room.make_room(t, refused))
    assert refused.calls == [("k8s.io", "c1", "/run/b", vram_room.RoomRequest({"all": 4 * GiB}, "start"))]
    quiet = Driver()
    asyncio.run(vram_room.make_room(task(), quiet))  # says nothing of its VRAM: no call
    assert quiet.calls == []
