"""The pass lane (shim/native/passlane.c through shim/passlane.py) on real unix sockets: a ttrpc server of
ours stands in for the runc shim, a Server with the lane in front stands in for the pod daemon, and a ttrpc
client plays containerd. What the lane takes must reach the child without Python and come back as the
child answered it; everything else must reach Python exactly as it came.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from harness.sockets import serve, short_dir

from kybernate.api import task_pb2
from kybernate.shim.passlane import Lane
from kybernate.shim.ttrpc.client import Client
from kybernate.shim.ttrpc.errors import Code, TTRPCError
from kybernate.shim.ttrpc.server import Call, Server
from kybernate.shim.upstream import TASK_V2, TASK_V3

NS = (("containerd-namespace-ttrpc", "k8s.io"),)
EVENTS = "containerd.services.events.ttrpc.v1.Events"


@dataclass
class Peer:
    """A ttrpc server that records what it was asked and echoes it back."""

    name: str
    calls: list[tuple[str, str]] = field(default_factory=list)
    hold: asyncio.Event | None = None  # set: answer; None: answer at once

    async def handle(self, call: Call) -> bytes:
        self.calls.append((call.service, call.method))
        if self.hold is not None:
            await self.hold.wait()
        if call.method == "Fail":
            raise TTRPCError(Code.NOT_FOUND, f"{self.name} has no such thing")
        return f"{self.name}:{call.method}:".encode() + call.payload


@dataclass
class Setup:
    lane: Lane
    child: Peer
    python: Peer
    child_server: Server
    server: Server
    client: Client
    sock_dir: str
    containerd: Peer  # containerd's events service
    events_server: Server

    async def call(self, method: str, payload: bytes = b"x", service: str = TASK_V2, timeout_nano: int = 0) -> bytes:
        return await self.client.call(service, method, payload, metadata=NS, timeout_nano=timeout_nano)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with short_dir("lane-") as path:
        yield path


@asynccontextmanager
async def lane_in_front(sock_dir: str, child_service: str = TASK_V2) -> AsyncIterator[Setup]:
    child, python, containerd = Peer("child"), Peer("python"), Peer("containerd")
    child_server, events_server = Server(child.handle), Server(containerd.handle)
    child_task = await serve(child_server, os.path.join(sock_dir, "child.sock"))
    events_task = await serve(events_server, os.path.join(sock_dir, "events.sock"))
    lane = Lane.open(os.path.join(sock_dir, "child.sock"), child_service, os.path.join(sock_dir, "events.sock"))
    assert lane is not None, "the pass lane's library is built by make venv"
    server = Server(python.handle, adopt=lane.adopt)
    server_task = await serve(server, os.path.join(sock_dir, "shim.sock"))
    client = await Client.connect(os.path.join(sock_dir, "shim.sock"))
    try:
        yield Setup(lane, child, python, child_server, server, client, sock_dir, containerd, events_server)
    finally:
        await client.close()
        for s in (server, child_server, events_server):
            s.close()
            await s.wait_closed()
        await asyncio.gather(server_task, child_task, events_task)
        lane.close()


async def _eventually(check, what: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout}s: {what}")


def test_calls_python_does_not_intercept_go_to_the_child_and_back_without_python(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            assert await s.call("State", b"st") == b"child:State:st"
            assert await s.call("Pids", b"p") == b"child:Pids:p"
            with pytest.raises(TTRPCError) as failed:  # the child's status, untouched
                await s.call("Fail")
            assert (failed.value.code, failed.value.message) == (Code.NOT_FOUND, "child has no such thing")
            assert s.child.calls == [(TASK_V2, "State"), (TASK_V2, "Pids"), (TASK_V2, "Fail")]
            assert s.python.calls == [] and s.lane.taken == 3

    asyncio.run(main())


def test_the_service_is_renamed_to_the_task_api_the_child_serves(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir, child_service=TASK_V3) as s:
            assert await s.call("State", service=TASK_V2) == b"child:State:x"
            assert await s.call("State", service=TASK_V3) == b"child:State:x"
            assert s.child.calls == [(TASK_V3, "State"), (TASK_V3, "State")] and s.lane.taken == 2

    asyncio.run(main())


def test_what_the_lane_does_not_take_reaches_python_as_it_came(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            big = os.urandom(100 << 10)  # over what the lane reads whole: streamed through to Python
            assert await s.call("State", big) == b"python:State:" + big
            assert await s.call("Create", b"c") == b"python:Create:c"  # intercepted by the task service
            assert await s.call("Start", b"\xff\xff") == b"python:Start:\xff\xff"  # no StartRequest it can read
            assert await s.call("Status", service="containerd.other.v1.Thing") == b"python:Status:x"
            assert s.python.calls == [(TASK_V2, "State"), (TASK_V2, "Create"),
                                      (TASK_V2, "Start"), ("containerd.other.v1.Thing", "Status")]
            assert s.child.calls == [] and s.lane.taken == 0

    asyncio.run(main())


def test_a_request_that_is_no_protobuf_gets_pythons_answer_and_the_connection_stays(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            def exchange() -> tuple[int, int, bytes]:  # a blocking peer, off the event loop
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                    raw.settimeout(5)
                    raw.connect(os.path.join(s.sock_dir, "shim.sock"))
                    body = b"\x0a\xff\xff\xff"  # a service field whose length never ends
                    raw.sendall(struct.pack(">IIBB", len(body), 1, 1, 0) + body)
                    length, stream, kind, _ = struct.unpack(">IIBB", raw.recv(10))
                    return stream, kind, raw.recv(length)

            stream, kind, answer = await asyncio.to_thread(exchange)
            assert (stream, kind) == (1, 2) and answer  # Python's protocol answered it, on its stream
            assert await s.call("State") == b"child:State:x"  # the other connection is untouched

    asyncio.run(main())


def test_the_runc_shims_events_go_to_containerd_without_python_while_no_task_hibernates(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            # The runc shim publishes on its own connection to our socket, one Forward at a time.
            publisher = await Client.connect(os.path.join(s.sock_dir, "shim.sock"))
            assert await publisher.call(EVENTS, "Forward", b"e1", metadata=NS) == b"containerd:Forward:e1"
            s.lane.gate(open_=True, connect_local=True, events_open=False)  # a task is hibernating: Python decides
            assert await publisher.call(EVENTS, "Forward", b"e2", metadata=NS) == b"python:Forward:e2"
            s.lane.gate(open_=True, connect_local=True, events_open=True)
            assert await publisher.call(EVENTS, "Other", b"e3", metadata=NS) == b"python:Other:e3"  # not an event
            s.containerd.hold = asyncio.Event()  # containerd stops answering: the lane's own deadline (or the call's)
            with pytest.raises(TTRPCError) as late:
                await publisher.call(EVENTS, "Forward", b"e4", metadata=NS, timeout_nano=200_000_000)
            assert (late.value.code, late.value.message) == (Code.DEADLINE_EXCEEDED, "deadline exceeded")
            pending = asyncio.create_task(publisher.call(EVENTS, "Forward", b"e5", metadata=NS))
            await _eventually(lambda: len(s.containerd.calls) == 3, "containerd got the held event")
            s.events_server.close()  # containerd restarts: what is pending is answered, and the child retries
            with pytest.raises(TTRPCError) as gone:
                await asyncio.wait_for(pending, 5)
            assert gone.value.code == Code.UNAVAILABLE
            assert gone.value.message == "containerd closed the events connection"
            assert await publisher.call(EVENTS, "Forward", b"e6", metadata=NS) == b"python:Forward:e6"  # Python dials
            assert s.containerd.calls == [(EVENTS, "Forward")] * 3
            assert s.python.calls == [(EVENTS, "Forward"), (EVENTS, "Other"), (EVENTS, "Forward")]
            assert s.lane.taken == 3
            await publisher.close()

    asyncio.run(main())


def test_a_taken_call_past_its_deadline_is_answered_as_python_answers_it(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            assert await s.call("State", timeout_nano=10**9) == b"child:State:x"  # a deadline it meets
            s.child.hold = asyncio.Event()  # the runc shim stops answering
            began = asyncio.get_running_loop().time()
            with pytest.raises(TTRPCError) as late:
                await s.call("State", timeout_nano=200_000_000)
            waited = asyncio.get_running_loop().time() - began
            assert (late.value.code, late.value.message) == (Code.DEADLINE_EXCEEDED, "deadline exceeded")
            assert 0.19 <= waited < 2.0, waited
            s.child.hold.set()  # its late answer is dropped; the connection goes on
            s.child.hold = None
            assert await s.call("Pids") == b"child:Pids:x"
            assert s.python.calls == [] and s.lane.taken == 3
        # Python's pass-through answers the same bytes (ttrpc/server.py _Passing.expire).
        from kybernate.shim.ttrpc.protocol import Response, ServerProtocol

        python_answer = ServerProtocol.response_frame(3, Response.from_error(
            TTRPCError(Code.DEADLINE_EXCEEDED, "deadline exceeded")))
        assert python_answer.payload == b"\x0a\x15\x08\x04\x12\x11deadline exceeded"

    asyncio.run(main())


def test_a_closed_gate_sends_everything_to_python(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            s.lane.task("c1", pid=77, plain=True)
            s.lane.gate(open_=False, connect_local=True, events_open=True)  # a task is hibernated
            start = task_pb2.StartRequest(id="c1").SerializeToString()
            assert await s.call("State") == b"python:State:x"
            assert await s.call("Start", start) == b"python:Start:" + start
            s.lane.gate(open_=True, connect_local=True, events_open=True)
            assert await s.call("Start", start) == b"child:Start:" + start
            assert s.lane.taken == 1

    asyncio.run(main())


def test_start_and_connect_are_taken_only_as_the_tables_say(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            s.lane.task("plain", pid=77, plain=True)
            s.lane.task("known", pid=78, plain=False)
            connect_plain = task_pb2.ConnectRequest(id="plain").SerializeToString()
            answered = task_pb2.ConnectResponse.FromString(await s.call("Connect", connect_plain))
            assert (answered.shim_pid, answered.task_pid) == (os.getpid(), 77)
            # Byte for byte what the task service writes for it (service.py _known_connect).
            assert await s.call("Connect", connect_plain) == task_pb2.ConnectResponse(
                shim_pid=os.getpid(), task_pid=77).SerializeToString()
            for task_id in ("known", "other"):
                start = task_pb2.StartRequest(id=task_id).SerializeToString()
                assert await s.call("Start", start) == b"python:Start:" + start  # not plain: its handler
            exec_start = task_pb2.StartRequest(id="known", exec_id="e1").SerializeToString()
            assert await s.call("Start", exec_start) == b"child:Start:" + exec_start  # an exec's Start is passed
            unknown = task_pb2.ConnectRequest(id="other").SerializeToString()
            assert await s.call("Connect", unknown) == b"python:Connect:" + unknown
            s.lane.gate(open_=True, connect_local=False, events_open=True)  # a task with GPU state: Connect is handled
            assert await s.call("Connect", connect_plain) == b"python:Connect:" + connect_plain
            s.lane.task("plain", pid=0, plain=False)  # deleted
            s.lane.gate(open_=True, connect_local=True, events_open=True)
            assert await s.call("Connect", connect_plain) == b"python:Connect:" + connect_plain
            s.lane.task("x" * 300, pid=5, plain=True)  # more than the lane holds: left to Python
            long_start = task_pb2.StartRequest(id="x" * 300).SerializeToString()
            assert await s.call("Start", long_start) == b"python:Start:" + long_start
            assert s.lane.taken == 3

    asyncio.run(main())


def test_calls_in_flight_when_the_child_goes_are_answered_unavailable_and_python_takes_the_rest(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            s.child.hold = asyncio.Event()  # the child never answers
            pending = asyncio.gather(*(s.call("State") for _ in range(3)), return_exceptions=True)
            await _eventually(lambda: len(s.child.calls) == 3, "the child got the three calls")
            s.child_server.close()  # the runc shim exits
            answers = await asyncio.wait_for(pending, 5)
            for answer in answers:
                assert isinstance(answer, TTRPCError) and answer.code == Code.UNAVAILABLE, answer
                assert answer.message == "the runc shim closed its connection"
            assert await s.call("State") == b"python:State:x"

    asyncio.run(main())


def test_either_side_closing_closes_the_other(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            assert await s.call("State") == b"child:State:x"
            second = await Client.connect(os.path.join(s.sock_dir, "shim.sock"))
            assert await second.call(TASK_V2, "Create", b"", metadata=NS) == b"python:Create:"
            assert s.server.connections == 2
            await second.close()  # containerd lets go of a connection: Python's side ends with it
            await _eventually(lambda: s.server.connections == 1, "Python's side of the connection closed")
            s.server.close()  # Python stops serving: containerd's connection ends
            await asyncio.wait_for(s.client.wait_closed(), 5)

    asyncio.run(main())


def test_many_calls_at_once_on_several_connections_each_get_their_own_answer(sock_dir) -> None:
    async def main() -> None:
        async with lane_in_front(sock_dir) as s:
            # Four containerd connections share the lane's one connection to the child, whose server (like
            # the runc shim's) wants every request's stream id above the last one it read.
            clients = [s.client, *[await Client.connect(os.path.join(s.sock_dir, "shim.sock")) for _ in range(3)]]
            methods = ["State" if i % 2 else "Create" for i in range(400)]
            answers = await asyncio.gather(*(clients[i % 4].call(TASK_V2, m, str(i).encode(), metadata=NS)
                                             for i, m in enumerate(methods)))
            for i, (method, answer) in enumerate(zip(methods, answers, strict=True)):
                who = "child" if method == "State" else "python"
                assert answer == f"{who}:{method}:{i}".encode()
            assert s.lane.taken == 200 and len(s.python.calls) == 200
            for client in clients[1:]:
                await client.close()

    asyncio.run(main())
