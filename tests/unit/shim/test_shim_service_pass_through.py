"""Which of containerd's task calls the shim's TaskService passes through without a task (shim/service.py
pass_through, _passable), and that a passed call answers exactly as its handler would: served by Python
alone, and with the pass lane in front (shim/passlane.py), which must answer every call the same way.

A real ttrpc server stands in for the runc shim child (answering task calls with real protobuf replies), the
TaskService serves containerd's side, and a ttrpc client plays containerd, all on real unix sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness.sockets import serve, short_dir

from kybernate.api import task_pb2
from kybernate.shim.passlane import Lane
from kybernate.shim.runtime_options import KybernateOptions, RuntimeConfig
from kybernate.shim.service import TaskService
from kybernate.shim.taskspec import GPU
from kybernate.shim.ttrpc.client import Client
from kybernate.shim.ttrpc.errors import Code, TTRPCError
from kybernate.shim.ttrpc.server import Call, Server
from kybernate.shim.upstream import TASK_V2, Upstream

CHILD_PID = 4242  # the runc shim's pid in its ConnectResponse
TASK_PID = 77
RESTORED_PID = 88  # a task created from a checkpoint gets its pid when runc restores it at Start


class Child:
    """The runc shim's side: real replies for the task calls these tests make, with its rules for pids
    (a task created from a checkpoint has none until Start; an unknown id has pid 0)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pids: dict[str, int] = {}

    async def handle(self, call: Call) -> bytes:
        self.calls.append(call.method)
        if call.method == "Connect":
            asked = task_pb2.ConnectRequest.FromString(call.payload).id
            return task_pb2.ConnectResponse(shim_pid=CHILD_PID, task_pid=self.pids.get(asked, 0)).SerializeToString()
        if call.method == "Create":
            request = task_pb2.CreateTaskRequest.FromString(call.payload)
            self.pids[request.id] = 0 if request.checkpoint else TASK_PID
            return task_pb2.CreateTaskResponse(pid=self.pids[request.id]).SerializeToString()
        if call.method == "Start":
            request = task_pb2.StartRequest.FromString(call.payload)
            if not request.exec_id and self.pids.get(request.id) == 0:
                self.pids[request.id] = RESTORED_PID
            return task_pb2.StartResponse(pid=self.pids.get(request.id, TASK_PID)).SerializeToString()
        if call.method == "Delete":
            self.pids.pop(task_pb2.DeleteRequest.FromString(call.payload).id, None)
            return task_pb2.DeleteResponse(pid=TASK_PID).SerializeToString()
        if call.method == "Kill":
            request = task_pb2.KillRequest.FromString(call.payload)
            if request.signal == 0:
                raise TTRPCError(Code.NOT_FOUND, "process already finished")
            return b""
        raise TTRPCError(Code.UNIMPLEMENTED, call.method)


@dataclass
class Setup:
    service: TaskService
    client: Client
    child: Child
    bundles: Path
    handled: list[str] = field(default_factory=list)
    lane: Lane | None = None

    def bundle(self, container_id: str, annotations: dict[str, str] | None = None) -> str:
        path = self.bundles / container_id
        path.mkdir()
        spec = {"ociVersion": "1.2.1", "process": {"args": ["sleep", "1"], "env": []}, "root": {"path": "rootfs"},
                "annotations": annotations or {}, "linux": {}}
        (path / "config.json").write_text(json.dumps(spec))
        return str(path)

    async def call(self, method: str, request: object) -> bytes:
        return await self.client.call(TASK_V2, method, request.SerializeToString(),  # type: ignore[attr-defined]
                                      metadata=(("containerd-namespace-ttrpc", "ns"),))


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with short_dir("svc-") as path:
        yield path


@pytest.fixture(params=["python", "lane"])
def via(request: pytest.FixtureRequest) -> str:
    """Who serves containerd's connection: Python alone, or the pass lane in front of it."""
    return str(request.param)


@asynccontextmanager
async def shim(sock_dir: str, tmp_path: Path, via: str) -> AsyncIterator[Setup]:
    child = Child()
    child_server = Server(child.handle)
    child_path = os.path.join(sock_dir, "child.sock")
    child_task = await serve(child_server, child_path)
    upstream = await Upstream.connect(child_path, 2)
    defaults = RuntimeConfig(kybernate=KybernateOptions(intent_dir=str(tmp_path / "intent")))
    service = TaskService(upstream, "ns", defaults, driver_for=lambda options: None)  # type: ignore[arg-type,return-value]
    handled: list[str] = []

    async def handle(call: Call) -> bytes:
        handled.append(call.method)
        return await service.handle(call)

    lane = Lane.open(child_path, upstream.service) if via == "lane" else None
    assert (lane is None) == (via == "python"), "the pass lane's library is built by make venv"
    service.lane = lane
    server = Server(handle, pass_through=service.pass_through, adopt=lane.adopt if lane else None)
    server_task = await serve(server, os.path.join(sock_dir, "shim.sock"))
    client = await Client.connect(os.path.join(sock_dir, "shim.sock"))
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    try:
        yield Setup(service, client, child, bundles, handled, lane)
    finally:
        await client.close()
        for s in (server, child_server):
            s.close()
            await s.wait_closed()
        await asyncio.gather(server_task, child_task)
        await upstream.close()
        if lane is not None:
            lane.close()


def test_a_plain_task_starts_connects_and_is_killed_through_the_pass_through(sock_dir, tmp_path, via) -> None:
    async def main() -> None:
        async with shim(sock_dir, tmp_path, via) as s:
            await s.call("Create", task_pb2.CreateTaskRequest(id="plain", bundle=s.bundle("plain")))
            started = task_pb2.StartResponse.FromString(await s.call("Start", task_pb2.StartRequest(id="plain")))
            connect = await s.call("Connect", task_pb2.ConnectRequest(id="plain"))
            connected = task_pb2.ConnectResponse.FromString(connect)
            await s.call("Kill", task_pb2.KillRequest(id="plain", signal=15))
            with pytest.raises(TTRPCError) as failed:  # the child's status, untouched
                await s.call("Kill", task_pb2.KillRequest(id="plain", signal=0))
            assert (failed.value.code, failed.value.message) == (Code.NOT_FOUND, "process already finished")
            exec_started = await s.call("Start", task_pb2.StartRequest(id="plain", exec_id="e1"))
            assert s.handled == ["Create"]  # everything after it went without a task
            # Connect (containerd's pid query) was answered from the pid the child gave at Create.
            assert s.child.calls == ["Create", "Start", "Kill", "Kill", "Start"]
            assert started.pid == TASK_PID and task_pb2.StartResponse.FromString(exec_started).pid == TASK_PID
            # The handler's rewrite, on the fast path too: containerd watches us, not the child.
            assert (connected.shim_pid, connected.task_pid) == (os.getpid(), TASK_PID)
            assert connect == task_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=TASK_PID).SerializeToString()
            if s.lane is not None:  # the plain Start, the Connect and the exec's Start never reached Python
                assert s.lane.taken == 3

            await s.call("Delete", task_pb2.DeleteRequest(id="plain"))
            assert s.handled == ["Create", "Delete"]
            # Deleted: its pid is forgotten, and the child answers as it does for an id it does not have.
            gone = task_pb2.ConnectResponse.FromString(await s.call("Connect", task_pb2.ConnectRequest(id="plain")))
            assert s.child.calls[-1] == "Connect" and (gone.shim_pid, gone.task_pid) == (os.getpid(), 0)
            # A Start for a task this shim no longer has (or never created) goes to the handler.
            await s.call("Start", task_pb2.StartRequest(id="plain"))
            assert s.handled == ["Create", "Delete", "Start"]

    asyncio.run(main())


def test_starts_that_need_the_handler_are_not_passed_through(sock_dir, tmp_path, via) -> None:
    async def main() -> None:
        async with shim(sock_dir, tmp_path, via) as s:
            # Created from a checkpoint: runc restores at Start, whose errors the handler maps (CRIU's log).
            await s.call("Create", task_pb2.CreateTaskRequest(id="restored", bundle=s.bundle("restored"),
                                                              checkpoint=str(tmp_path / "image")))
            await s.call("Start", task_pb2.StartRequest(id="restored"))
            # A GPU container (LIVE): while it exists, Connect may have GPU steps to reconcile, so it is handled.
            await s.call("Create", task_pb2.CreateTaskRequest(id="gpu", bundle=s.bundle("gpu", {GPU: "true"})))
            await s.call("Connect", task_pb2.ConnectRequest(id="restored"))
            assert s.handled == ["Create", "Start", "Create", "Connect"]
            # Bytes that are no StartRequest: the handler's INVALID_ARGUMENT, nothing sent on.
            before = list(s.child.calls)
            with pytest.raises(TTRPCError) as bad:
                await s.client.call(TASK_V2, "Start", b"\xff\xff\xff")
            assert bad.value.code == Code.INVALID_ARGUMENT and s.child.calls == before

    asyncio.run(main())


def test_connect_asks_the_child_until_a_restored_task_has_its_pid(sock_dir, tmp_path, via) -> None:
    async def main() -> None:
        async with shim(sock_dir, tmp_path, via) as s:
            await s.call("Create", task_pb2.CreateTaskRequest(id="restored", bundle=s.bundle("restored"),
                                                              checkpoint=str(tmp_path / "image")))
            before = task_pb2.ConnectResponse.FromString(await s.call("Connect", task_pb2.ConnectRequest(id="restored")))
            assert s.child.calls == ["Create", "Connect"] and before.task_pid == 0  # not restored yet
            await s.call("Start", task_pb2.StartRequest(id="restored"))
            after = task_pb2.ConnectResponse.FromString(await s.call("Connect", task_pb2.ConnectRequest(id="restored")))
            assert s.child.calls == ["Create", "Connect", "Start"]  # the pid runc restored it with, known here
            assert (after.shim_pid, after.task_pid) == (os.getpid(), RESTORED_PID)

    asyncio.run(main())


def test_connect_is_handled_while_a_task_has_gpu_state(sock_dir, tmp_path, via) -> None:
    async def main() -> None:
        async with shim(sock_dir, tmp_path, via) as s:
            await s.call("Create", task_pb2.CreateTaskRequest(id="plain", bundle=s.bundle("plain")))
            await s.call("Create", task_pb2.CreateTaskRequest(id="gpu", bundle=s.bundle("gpu", {GPU: "true"})))
            reply = task_pb2.ConnectResponse.FromString(await s.call("Connect", task_pb2.ConnectRequest(id="plain")))
            # connect() ran (it settles GPU steps) and asked the child; the answer is the same.
            assert s.handled == ["Create", "Create", "Connect"] and s.child.calls[-1] == "Connect"
            assert s.lane is None or s.lane.taken == 0
            assert (reply.shim_pid, reply.task_pid) == (os.getpid(), TASK_PID)

    asyncio.run(main())
