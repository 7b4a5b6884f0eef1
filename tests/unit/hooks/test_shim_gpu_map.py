"""Restore onto the container's own GPUs (issue 17): the kybernate.io/gpu-map annotation and
NVIDIA_VISIBLE_DEVICES, parsed at Create and planned at the GPU restore; with hookd and the fake driver
modelling two GPUs, a process checkpointed on GPU 0 comes back on GPU 1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import fakegpu
import pytest
from hookd_testlib import G0, G1, GiB, events_for, run
from test_hookd_service import serving, settings

from kybernate.hooks.api.model import GpuDeviceRecord, GpuManifest
from kybernate.shim import gpu_map
from kybernate.shim.errors import InvalidArgument
from kybernate.shim.gpu_map import GpuMapError, GpuTargets
from kybernate.shim.runtime_options import KybernateOptions
from kybernate.shim.taskspec import TaskSpec


def manifest(*uuids: str) -> GpuManifest:
    return GpuManifest(gpus=tuple(GpuDeviceRecord(uuid=u, name="H100", index=i, vram_used_bytes=GiB)
                                  for i, u in enumerate(uuids)))


def spec(env: list[str] | None = None, **notes: str) -> dict[str, object]:
    return {"annotations": notes, "process": {"env": env or []}}


def parse(s: dict[str, object]) -> TaskSpec:
    return TaskSpec.parse("c1", "k8s.io", "/b", s, KybernateOptions())


def test_the_annotation_is_parsed_and_wins_over_the_device_list() -> None:
    t = parse(spec([f"NVIDIA_VISIBLE_DEVICES={G0}"], **{"kybernate.io/gpu-map": f" {G0} = {G1} "})).gpu_targets
    assert t == GpuTargets(explicit=((G0, G1),))
    assert gpu_map.plan(manifest(G0), t) == {G0: G1}


@pytest.mark.parametrize("value, why", [
    ("", "empty"),
    ("GPU-0", "is not <old uuid>=<new uuid>"),
    (f"{G0}", "is not <old uuid>=<new uuid>"),
    (f"{G0}=1", "is not <old uuid>=<new uuid>"),
    (f"{G0}={G1},{G0}={G0}", "the same old GPU is named twice"),
    (f"{G0}={G1},{G1}={G1}", "the same new GPU is named twice"),
    ("x" * 1500, "longer than the limit of 1400 bytes"),
])
def test_a_bad_annotation_fails_the_create_with_invalid_argument(value: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why) as info:
        parse(spec(**{"kybernate.io/gpu-map": value}))
    assert "kybernate.io/gpu-map" in str(info.value)


@pytest.mark.parametrize("value, visible", [
    ("", ()), ("all", ()), ("none", ()), ("void", ()), ("1", ("1",)), ("0, 1", ("0", "1")),
    ("GPU-" + G1[4:].upper(), (G1,)),
])
def test_the_device_list_names_the_containers_gpus(value: str, visible: tuple[str, ...]) -> None:
    assert parse(spec([f"NVIDIA_VISIBLE_DEVICES={value}"])).gpu_targets.visible == visible


def test_a_device_list_the_shim_cannot_read_says_nothing_and_the_create_goes_on() -> None:
    assert not parse(spec(["NVIDIA_VISIBLE_DEVICES=MIG-1234,0"])).gpu_targets
    with pytest.raises(InvalidArgument, match="more than 16"):
        parse(spec(["NVIDIA_VISIBLE_DEVICES=" + ",".join(str(i) for i in range(17))]))


def test_a_checkpointed_gpu_outside_the_containers_gpus_goes_to_one_of_them() -> None:
    assert gpu_map.plan(manifest(G0), GpuTargets(visible=(G1,))) == {G0: G1}
    assert gpu_map.plan(manifest(G0), GpuTargets(visible=(G0, G1))) == {}  # still one of its GPUs
    # Two checkpointed GPUs, the container has G1 and a third: G1 stays, G0 takes the free one.
    third = "GPU-33333333-0000-0000-0000-000000000000"
    assert gpu_map.plan(manifest(G0, G1), GpuTargets(visible=(G1, third))) == {G0: third}
    assert gpu_map.plan(manifest(G0), GpuTargets(visible=("1",)), {0: G0, 1: G1}) == {G0: G1}
    assert gpu_map.plan(None, GpuTargets(visible=(G1,))) == {}
    with pytest.raises(GpuMapError, match="too few"):
        gpu_map.plan(manifest(G0, G1), GpuTargets(visible=(third,)))
    with pytest.raises(GpuMapError, match="inventory does not list"):
        gpu_map.plan(manifest(G0), GpuTargets(visible=("5",)), {0: G0, 1: G1})


@pytest.mark.parametrize("targets", [GpuTargets(visible=(G1,)), GpuTargets(visible=("1",)),
                                     GpuTargets(explicit=((G0, G1),))])
def test_the_shims_restore_lands_on_the_other_gpu(tmp_path: Path, fake_driver: fakegpu.Built, node: fakegpu.FakeNode,
                                                  spawn: Callable[..., int], targets: GpuTargets) -> None:
    from kybernate.shim.hookd_driver import HookdDriver

    a = spawn("a", G0, GiB)
    s = settings(tmp_path, fake_driver)

    async def go() -> None:
        async with serving(s):
            driver = HookdDriver(s.server.socket, timeout_s=60)
            m = await driver.checkpoint("k8s.io", "c1", [a], 1000)
            assert [g.uuid for g in m.gpus] == [G0]
            await driver.restore("k8s.io", "c1", [a], m, targets)
            await driver._client.close()

    run(go())
    assert node.state("a").get("state", "").upper() == "RUNNING"
    [restore] = events_for(node, "restore")
    assert (restore.gpu, restore.pairs) == (G1, 1)  # hookd passed the driver the pair G0 -> G1


def test_a_device_list_that_cannot_take_the_checkpoint_leaves_the_choice_to_hookd(
        tmp_path: Path, fake_driver: fakegpu.Built, node: fakegpu.FakeNode, spawn: Callable[..., int]) -> None:
    from kybernate.shim.hookd_driver import HookdDriver

    a = spawn("a", G0, GiB)
    s = settings(tmp_path, fake_driver)

    async def go() -> None:
        async with serving(s):
            driver = HookdDriver(s.server.socket, timeout_s=60)
            m = await driver.checkpoint("k8s.io", "c1", [a], 1000)
            await driver.restore("k8s.io", "c1", [a], m, GpuTargets(visible=("7",)))  # no GPU 7 here
            await driver._client.close()

    run(go())
    [restore] = events_for(node, "restore")
    assert (restore.gpu, restore.pairs) == (G0, 0)  # back where it was, nothing stranded
    assert node.state("a").get("state", "").upper() == "RUNNING"


def test_a_gpu_map_the_node_cannot_meet_is_refused_before_any_driver_call(
        tmp_path: Path, fake_driver: fakegpu.Built, node: fakegpu.FakeNode, spawn: Callable[..., int]) -> None:
    from kybernate.hooks.api.client import HookdError
    from kybernate.shim.hookd_driver import HookdDriver

    a = spawn("a", G0, GiB)
    s = settings(tmp_path, fake_driver)
    gone = "GPU-99999999-0000-0000-0000-000000000000"

    async def go() -> None:
        async with serving(s):
            driver = HookdDriver(s.server.socket, timeout_s=60)
            m = await driver.checkpoint("k8s.io", "c1", [a], 1000)
            with pytest.raises(HookdError, match="which this node does not have"):
                await driver.restore("k8s.io", "c1", [a], m, GpuTargets(explicit=((G0, gone),)))
            await driver._client.close()

    run(go())
    assert events_for(node, "restore") == []
    assert node.state("a").get("state", "").upper() == "CHECKPOINTED"
