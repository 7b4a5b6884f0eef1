"""The events hop (shim/events.py): what it reads of a ForwardRequest, and that it forwards the bytes untouched
and in order, over a real ttrpc connection to a stand-in for containerd's events service."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from kybernate.api import hibernate_pb2
from kybernate.shim import events
from kybernate.shim.ttrpc.errors import Code, TTRPCError
from kybernate.shim.ttrpc.server import Call, Server


def forward_request(topic: str, container_id: str, type_url: str = "containerd.events.TaskExit") -> bytes:
    event = hibernate_pb2.TaskExit(container_id=container_id, id=container_id, pid=42, exit_status=137)
    return hibernate_pb2.ForwardRequest(envelope=hibernate_pb2.Envelope(
        namespace="k8s.io", topic=topic, event=any_pb2.Any(type_url=type_url, value=event.SerializeToString()),
    )).SerializeToString()


def test_topic_and_container_id_are_read_without_decoding_the_rest() -> None:
    assert events.envelope_topic_and_id(forward_request("/tasks/exit", "abc")) == ("/tasks/exit", "abc")
    delete = hibernate_pb2.TaskDelete(container_id="c1", pid=7, id="c1")
    payload = hibernate_pb2.ForwardRequest(envelope=hibernate_pb2.Envelope(
        topic="/tasks/delete", event=any_pb2.Any(type_url="x", value=delete.SerializeToString()))).SerializeToString()
    assert events.envelope_topic_and_id(payload) == ("/tasks/delete", "c1")


@pytest.mark.parametrize("payload", [b"", b"\x0a\x05ab", b"\xff\xff\xff", b"\x0a\x80"])
def test_malformed_requests_read_as_nothing(payload: bytes) -> None:
    assert events.envelope_topic_and_id(payload) == ("", "")


def test_the_task_id_of_a_task_request_is_its_field_one() -> None:
    from kybernate.api import task_pb2

    assert events.first_string_field(task_pb2.KillRequest(id="t1", signal=9).SerializeToString()) == "t1"
    assert events.first_string_field(task_pb2.StateRequest(exec_id="e").SerializeToString()) == ""
    assert events.first_string_field(b"\xff") == ""


async def _containerd(path: str, seen: list[bytes], fail_first: int = 0) -> Server:
    failures = [fail_first]

    async def handler(call: Call) -> bytes:
        assert (call.service, call.method) == (events.EVENTS_SERVICE, "Forward")
        if failures[0]:
            failures[0] -= 1
            raise TTRPCError(Code.UNAVAILABLE, "busy")
        seen.append(call.payload)
        return b""

    server = Server(handler)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    asyncio.get_running_loop().create_task(server.serve_socket(sock))
    return server


def _call(payload: bytes) -> Call:
    return Call(service=events.EVENTS_SERVICE, method="Forward", payload=payload,
                metadata=(("containerd-namespace-ttrpc", "k8s.io"),), timeout_nano=0, stream_id=1)


def test_events_are_forwarded_untouched_in_order_and_dropped_only_by_the_rule(tmp_path: Path) -> None:
    async def run() -> tuple[list[bytes], int]:
        seen: list[bytes] = []
        path = str(tmp_path / "c.sock.ttrpc")
        server = await _containerd(path, seen)
        proxy = events.EventsProxy(path)
        sent = [forward_request(f"/tasks/t{i}", f"c{i}") for i in range(20)]
        for payload in sent[:10]:
            await proxy.handle(_call(payload))
        proxy.drop_rule = lambda topic, cid: cid == "c12"
        for payload in sent[10:]:
            await proxy.handle(_call(payload))
        await proxy.publish("k8s.io", "/tasks/exit", "containerd.events.TaskExit", b"\x0a\x02zz")
        await proxy.close()
        server.close()
        await server.wait_closed()
        assert seen[:19] == [p for p in sent if p != sent[12]]
        assert events.envelope_topic_and_id(seen[19]) == ("/tasks/exit", "zz")
        return seen, proxy.dropped

    seen, dropped = asyncio.run(run())
    assert len(seen) == 20 and dropped == 1


def test_a_failure_is_answered_to_the_child_which_retries(tmp_path: Path) -> None:
    async def run() -> None:
        seen: list[bytes] = []
        path = str(tmp_path / "c.sock.ttrpc")
        server = await _containerd(path, seen, fail_first=1)
        proxy = events.EventsProxy(path)
        with pytest.raises(TTRPCError) as err:
            await proxy.handle(_call(forward_request("/tasks/exit", "a")))
        assert err.value.code == Code.UNAVAILABLE
        await proxy.handle(_call(forward_request("/tasks/exit", "a")))  # the child's retry
        assert len(seen) == 1
        await proxy.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())


def test_no_containerd_address_is_a_clear_error() -> None:
    with pytest.raises(TTRPCError) as err:
        asyncio.run(events.EventsProxy("").handle(_call(forward_request("/tasks/exit", "a"))))
    assert err.value.code == Code.UNAVAILABLE and "TTRPC_ADDRESS" in err.value.message
