"""Client and server over real unix sockets, plus raw peers that break the rules."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from kybernate.shim.ttrpc import server as server_module
from kybernate.shim.ttrpc.client import Client
from kybernate.shim.ttrpc.connection import from_socket
from kybernate.shim.ttrpc.errors import Code, ConnectionClosed, TTRPCError
from kybernate.shim.ttrpc.frames import MAX_MESSAGE_LENGTH, Flags, Frame, FrameDecoder, FrameType, encode_frame
from kybernate.shim.ttrpc.protocol import Request, Response, decode_response, encode_request, encode_response
from kybernate.shim.ttrpc.server import Call, Server

SVC = "containerd.task.v2.Task"


class Service:
    """A handler with one method per behaviour under test."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled: list[str] = []
        self.calls: list[Call] = []

    async def handle(self, call: Call) -> bytes:
        self.calls.append(call)
        if call.method == "Echo":
            return call.payload
        if call.method == "Meta":
            return json.dumps([call.service, call.method, call.metadata, call.timeout_nano, call.stream_id]).encode()
        if call.method in ("Wait", "Sleep"):
            self.started.set()
            try:
                await (self.release.wait() if call.method == "Wait" else asyncio.Event().wait())
            except asyncio.CancelledError:
                self.cancelled.append(call.method)
                raise
            return b"exited"
        if call.method == "Fail":
            raise TTRPCError(Code.NOT_FOUND, "no such task", (b"\x0a\x01x",))
        if call.method == "Crash":
            raise RuntimeError("secret internal detail")
        if call.method == "OwnTimeout":
            raise TimeoutError("the handler's own timeout")
        if call.method == "Stray":
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.cancel()
            await future
        if call.method == "Big":
            return bytes(MAX_MESSAGE_LENGTH)
        raise TTRPCError(Code.UNIMPLEMENTED, f"{call.service}/{call.method} is not implemented")


@asynccontextmanager
async def serving(sock_dir: str, service: Service, **kwargs: bool) -> AsyncIterator[tuple[Server, str]]:
    path = os.path.join(sock_dir, "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    server = Server(service.handle, **kwargs)
    task = asyncio.create_task(server.serve_socket(listener))
    try:
        yield server, path
    finally:
        server.close()
        await server.wait_closed()
        await task
        os.unlink(path)


class RawPeer:
    """A client that writes whatever bytes a test wants and reads frames back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.decoder = reader, writer, FrameDecoder()

    @classmethod
    async def connect(cls, path: str) -> RawPeer:
        return cls(*await asyncio.open_unix_connection(path))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, stream_id: int, method: str = "Echo", payload: bytes = b"", flags: int = 0) -> None:
        body = encode_request(Request(SVC, method, payload))
        await self.send(encode_frame(Frame(stream_id, FrameType.REQUEST, flags, body)))

    async def frame(self) -> Frame | None:
        """The next frame, or None at EOF."""
        while True:
            event = self.decoder.next_frame()
            if event is not None:
                assert isinstance(event, Frame)
                return event
            data = await self.reader.read(65536)
            if not data:
                return None
            self.decoder.feed(data)

    async def response(self) -> tuple[int, Response]:
        frame = await self.frame()
        assert frame is not None and frame.type == FrameType.RESPONSE
        return frame.stream_id, decode_response(frame.payload)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def header(length: int, stream_id: int, type_: int) -> bytes:
    return length.to_bytes(4, "big") + stream_id.to_bytes(4, "big") + bytes([type_, 0])


def request_bytes(stream_id: int, payload: bytes, method: str = "Echo") -> bytes:
    """A whole request frame, as a client writes it."""
    return encode_frame(Frame(stream_id, FrameType.REQUEST, 0, encode_request(Request(SVC, method, payload))))


# --- calls -----------------------------------------------------------------------------------------


def test_a_blocking_call_does_not_hold_up_others(arun, sock_dir):
    async def main() -> None:
        service = Service()
        async with serving(sock_dir, service) as (server, path):
            client = await Client.connect(path)
            wait = asyncio.create_task(client.call(SVC, "Wait", b""))
            await service.started.wait()
            echoes = await asyncio.gather(*(client.call(SVC, "Echo", str(i).encode()) for i in range(50)))
            assert echoes == [str(i).encode() for i in range(50)]
            other = await Client.connect(path)
            assert await other.call(SVC, "Echo", b"second connection") == b"second connection"
            assert not wait.done() and server.in_flight == 1
            service.release.set()
            assert await wait == b"exited"
            await client.close()
            await other.close()

    arun(main())


def test_metadata_and_call_fields_round_trip(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            client = await Client.connect(path)
            metadata = (("containerd-namespace-ttrpc", "k8s.io"), ("x", "1"), ("x", "2"))
            await client.call(SVC, "Echo", b"")
            reply = json.loads(await client.call(SVC, "Meta", b"", metadata=metadata, timeout_nano=10**10))
            assert reply == [SVC, "Meta", [list(kv) for kv in metadata], 10**10, 3]
            await client.close()

    arun(main())


def test_status_passes_through_untouched(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            client = await Client.connect(path)
            response = await client.call_raw(SVC, "Fail", b"")
            assert response == Response(Code.NOT_FOUND, "no such task", (b"\x0a\x01x",), b"")
            with pytest.raises(TTRPCError) as info:
                await client.call(SVC, "Fail", b"")
            assert (info.value.code, info.value.message, info.value.details) == response_fields(response)
            with pytest.raises(TTRPCError) as info:
                await client.call(SVC, "Nope", b"")
            assert info.value.code == Code.UNIMPLEMENTED
            await client.close()

    arun(main())


def response_fields(response: Response) -> tuple[Code, str, tuple[bytes, ...]]:
    return response.status_code, response.status_message, response.status_details


def test_unexpected_handler_errors_become_unknown_and_are_logged(arun, sock_dir, caplog):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            client = await Client.connect(path)
            response = await client.call_raw(SVC, "Crash", b"")
            assert (response.status_code, response.status_message) == (Code.UNKNOWN, "internal error")
            own = await client.call_raw(SVC, "OwnTimeout", b"", timeout_nano=10**10)
            assert own.status_code == Code.UNKNOWN
            stray = await client.call_raw(SVC, "Stray", b"")
            assert stray.status_code == Code.CANCELLED
            assert await client.call(SVC, "Echo", b"still fine") == b"still fine"
            await client.close()

    with caplog.at_level(logging.ERROR, logger="kybernate.shim.ttrpc"):
        arun(main())
    failures = [r for r in caplog.records if r.getMessage() == "handler failed"]
    assert len(failures) == 3
    assert "secret internal detail" in str(failures[0].exc_info[1])


# --- deadlines -------------------------------------------------------------------------------------


def test_timeout_nano_is_enforced_by_the_server(arun, sock_dir):
    async def main() -> None:
        service = Service()
        async with serving(sock_dir, service) as (server, path):
            client = await Client.connect(path)
            response = await client.call_raw(SVC, "Sleep", b"", timeout_nano=50_000_000)
            assert response.status_code == Code.DEADLINE_EXCEEDED
            assert service.cancelled == ["Sleep"]
            expired = await client.call_raw(SVC, "Echo", b"", timeout_nano=-1)
            assert expired.status_code == Code.DEADLINE_EXCEEDED
            assert server.in_flight == 0
            await client.close()

    arun(main())


def test_local_timeout_raises_deadline_exceeded_and_forgets_the_stream(arun, sock_dir):
    async def main() -> None:
        service = Service()
        async with serving(sock_dir, service) as (_, path):
            client = await Client.connect(path)
            with pytest.raises(TTRPCError) as info:
                await client.call(SVC, "Sleep", b"", timeout=0.05, timeout_nano=10**10)
            assert info.value.code == Code.DEADLINE_EXCEEDED
            with pytest.raises(TTRPCError) as info:  # the timeout is also sent as the deadline
                await client.call(SVC, "Sleep", b"", timeout=0.05)
            assert info.value.code == Code.DEADLINE_EXCEEDED
            assert await client.call(SVC, "Echo", b"ok", timeout=1) == b"ok"
            assert service.calls[-2].timeout_nano == 50_000_000  # the server reads in order
            await client.close()

    arun(main())


# --- size limits -----------------------------------------------------------------------------------


def test_oversized_request_gets_resource_exhausted_and_the_connection_goes_on(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            peer = await RawPeer.connect(path)
            length = MAX_MESSAGE_LENGTH + 1000
            await peer.send(header(length, 1, FrameType.REQUEST))
            stream_id, response = await peer.response()  # answered from the header alone
            assert (stream_id, response.status_code) == (1, Code.RESOURCE_EXHAUSTED)
            for _ in range(5):
                await peer.send(b"\x00" * (length // 5))
            await peer.send(b"\x00" * (length % 5))
            await peer.request(3, "Echo", b"after")
            assert await peer.response() == (3, Response(payload=b"after"))
            await peer.close()

    arun(main())


def test_several_requests_in_one_write_are_each_answered(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (server, path):
            peer = await RawPeer.connect(path)
            wire = b"".join(request_bytes(i, b"%d" % i) for i in range(1, 40, 2))
            await peer.send(wire)  # twenty frames reach the server in one read (or a few)
            answers = dict([await peer.response() for _ in range(20)])
            assert answers == {i: Response(payload=b"%d" % i) for i in range(1, 40, 2)}
            await peer.close()
            await server.drain(5.0)
            assert server.budget.used_small == 0

    arun(main())


def test_a_request_split_across_many_writes_is_answered(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            peer = await RawPeer.connect(path)
            wire = encode_frame(Frame(1, FrameType.REQUEST, 0, encode_request(Request(SVC, "Echo", b"p" * 70_000))))
            for start in range(0, len(wire), 7_001):  # the header cut after 7 001 bytes of its own frame...
                await peer.send(wire[start:start + 7_001])
            await peer.send(request_bytes(3, b"q")[:4])
            assert await peer.response() == (1, Response(payload=b"p" * 70_000))
            await peer.send(request_bytes(3, b"q")[4:])
            assert await peer.response() == (3, Response(payload=b"q"))  # ...and a header split in two
            await peer.close()

    arun(main())


def test_a_peer_closing_mid_frame_releases_what_the_frame_held(arun, sock_dir, caplog):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (server, path):
            peer = await RawPeer.connect(path)
            await peer.send(header(100_000, 1, FrameType.REQUEST) + b"only part of the body")
            other = await Client.connect(path)  # served while the first peer holds its reservation
            assert await other.call(SVC, "Echo", b"meanwhile") == b"meanwhile"
            assert server.budget.used == 100_000
            await peer.close()
            await other.close()
            await server.drain(5.0)
        assert server.budget.used == 0 and server.budget.used_small == 0

    with caplog.at_level(logging.WARNING):
        arun(main())
    assert "peer closed mid-frame" in caplog.text


def test_a_peer_that_does_not_read_its_answers_is_not_read_either_until_it_does(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (server, path):
            peer = await RawPeer.connect(path)
            body = b"a" * 16_000
            count = 400  # 6.4 MB of answers: far more than the socket buffers and the write buffer hold
            wire = b"".join(encode_frame(Frame(i, FrameType.REQUEST, 0, encode_request(Request(SVC, "Echo", body))))
                            for i in range(1, 2 * count, 2))
            writing = asyncio.create_task(peer.send(wire))
            done, _ = await asyncio.wait([writing], timeout=0.5)
            # The server stopped reading once its answers backed up, so our write cannot finish either.
            assert not done and server.in_flight < count
            answers = [await peer.response() for _ in range(count)]
            await writing
            assert sorted(sid for sid, _ in answers) == list(range(1, 2 * count, 2))
            assert all(r == Response(payload=body) for _, r in answers)
            await peer.close()

    arun(main())


def test_too_large_messages_either_way_are_resource_exhausted(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            client = await Client.connect(path)
            with pytest.raises(TTRPCError) as info:
                await client.call(SVC, "Echo", bytes(MAX_MESSAGE_LENGTH))
            assert info.value.code == Code.RESOURCE_EXHAUSTED
            with pytest.raises(TTRPCError) as info:
                await client.call(SVC, "Big", b"")
            assert info.value.code == Code.RESOURCE_EXHAUSTED
            big = bytes(MAX_MESSAGE_LENGTH - 100)
            assert await client.call(SVC, "Echo", big) == big
            await client.close()

    arun(main())


def test_client_skips_an_oversized_response_and_keeps_the_connection(arun, sock_dir):
    served = asyncio.Event()

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        seen = 0
        while seen < 2:
            decoder.feed(await reader.read(65536))
            seen += len(list(decoder))
        length = MAX_MESSAGE_LENGTH + 1
        writer.write(header(length, 1, FrameType.RESPONSE) + b"\x00" * length)
        writer.write(encode_frame(Frame(3, FrameType.RESPONSE, 0, encode_response(Response(payload=b"ok")))))
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()
        served.set()

    async def main() -> None:
        path = os.path.join(sock_dir, "fake.sock")
        fake = await asyncio.start_unix_server(fake_server, path)
        client = await Client.connect(path)
        first = asyncio.create_task(client.call(SVC, "A", b""))
        second = asyncio.create_task(client.call(SVC, "B", b""))
        with pytest.raises(TTRPCError) as info:
            await first
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert await second == b"ok"
        await client.close()
        await served.wait()  # the fake saw the client's EOF (its task is done, not left for the leak check)
        fake.close()
        await fake.wait_closed()

    arun(main())


# --- protocol violations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        encode_frame(Frame(2, FrameType.REQUEST, 0, b"")),  # even id
        encode_frame(Frame(1, FrameType.RESPONSE, 0, b"")),  # clients do not answer
    ],
    ids=["garbage", "even-id", "response-from-client"],
)
def test_a_violation_closes_only_that_connection(arun, sock_dir, caplog, bad):
    async def main() -> None:
        service = Service()
        async with serving(sock_dir, service) as (server, path):
            client = await Client.connect(path)
            wait = asyncio.create_task(client.call(SVC, "Wait", b""))
            await service.started.wait()
            peer = await RawPeer.connect(path)
            await peer.request(1, "Echo", b"before")
            assert await peer.response() == (1, Response(payload=b"before"))
            await peer.send(bad)
            assert await peer.frame() is None  # EOF: dropped
            await peer.close()
            assert await client.call(SVC, "Echo", b"unaffected") == b"unaffected"
            service.release.set()
            assert await wait == b"exited"
            await client.close()

    with caplog.at_level(logging.ERROR, logger="kybernate.shim.ttrpc"):
        arun(main())
    assert any(r.getMessage() == "protocol violation, closing connection" for r in caplog.records)


def test_reused_stream_id_closes_the_connection(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            peer = await RawPeer.connect(path)
            await peer.request(5)
            await peer.response()
            await peer.request(3)
            assert await peer.frame() is None
            await peer.close()

    arun(main())


def test_bad_request_bodies_and_streams_are_answered_per_stream(arun, sock_dir):
    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            peer = await RawPeer.connect(path)
            await peer.send(encode_frame(Frame(1, FrameType.REQUEST, 0, b"\xff not protobuf")))
            stream_id, response = await peer.response()
            assert (stream_id, response.status_code) == (1, Code.INVALID_ARGUMENT)
            await peer.request(3, "Echo", b"", flags=Flags.REMOTE_OPEN)
            stream_id, response = await peer.response()
            assert (stream_id, response.status_code) == (3, Code.UNIMPLEMENTED)
            await peer.send(encode_frame(Frame(3, FrameType.DATA, Flags.REMOTE_CLOSED, b"ignored")))
            await peer.send(encode_frame(Frame(7, 42, 0, b"unknown type, ignored")))
            await peer.request(5, "Echo", b"fine")
            assert await peer.response() == (5, Response(payload=b"fine"))
            await peer.close()

    arun(main())


# --- connection loss and shutdown ------------------------------------------------------------------


def test_eof_mid_call_fails_every_pending_call(arun, sock_dir):
    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        seen = 0
        while seen < 3:
            decoder.feed(await reader.read(65536))
            seen += len(list(decoder))
        writer.write(header(100, 1, FrameType.RESPONSE) + b"half")  # then EOF in the middle of a frame
        writer.close()

    async def main() -> None:
        path = os.path.join(sock_dir, "fake.sock")
        fake = await asyncio.start_unix_server(fake_server, path)
        client = await Client.connect(path)
        calls = [asyncio.create_task(client.call(SVC, "Wait", b"")) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, ConnectionClosed) for r in results), results
        await client.wait_closed()
        assert client.closed
        with pytest.raises(ConnectionClosed):
            await client.call(SVC, "Echo", b"")
        await client.close()
        fake.close()
        await fake.wait_closed()

    arun(main())


def test_client_leaving_cancels_its_calls_on_the_server(arun, sock_dir):
    async def main() -> None:
        service = Service()
        async with serving(sock_dir, service) as (server, path):
            client = await Client.connect(path)
            wait = asyncio.create_task(client.call(SVC, "Wait", b""))
            await service.started.wait()
            await client.close()
            with pytest.raises(ConnectionClosed):
                await wait
            while server.connections:
                await asyncio.sleep(0.01)
            assert service.cancelled == ["Wait"] and server.in_flight == 0

    arun(main())


def test_close_cancels_calls_closes_connections_and_leaves_no_tasks(arun, sock_dir):
    async def main() -> None:
        service = Service()
        async with serving(sock_dir, service) as (server, path):
            clients = [await Client.connect(path) for _ in range(3)]
            waits = [asyncio.create_task(c.call(SVC, "Sleep", b"")) for c in clients]
            while len(service.calls) < 3:
                await asyncio.sleep(0.01)
            assert server.connections == 3 and server.in_flight == 3
            server.close()
            await server.wait_closed()
            assert server.connections == 0 and server.in_flight == 0
            assert service.cancelled == ["Sleep"] * 3
            for wait in waits:
                with pytest.raises(ConnectionClosed):
                    await wait
            for client in clients:
                await client.close()
        # arun fails the test if any task is still running here

    arun(main())


def test_drain_waits_for_calls_in_flight(arun, sock_dir):
    async def main() -> None:
        service = Service()
        async with serving(sock_dir, service) as (server, path):
            client = await Client.connect(path)
            wait = asyncio.create_task(client.call(SVC, "Wait", b""))
            await service.started.wait()
            assert await server.drain(0.05) is False
            service.release.set()
            assert await server.drain(1) is True
            assert await wait == b"exited"
            await client.close()

    arun(main())


# --- sockets and peers -----------------------------------------------------------------------------


def test_serve_path_makes_a_private_socket_and_removes_it(arun, sock_dir):
    async def main() -> None:
        path = os.path.join(sock_dir, "p.sock")
        server = Server(Service().handle)
        task = asyncio.create_task(server.serve_path(f"unix://{path}"))
        while not os.path.exists(path):
            await asyncio.sleep(0.01)
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        client = await Client.connect(f"unix://{path}")
        assert await client.call(SVC, "Echo", b"x") == b"x"
        server.close()
        await server.wait_closed()
        await task
        assert not os.path.exists(path)
        await client.close()

    arun(main())


def test_connections_from_another_user_are_refused(arun, sock_dir, caplog, monkeypatch):
    monkeypatch.setattr(server_module, "peer_credentials", lambda sock: (4242, os.geteuid() + 1, 0))

    async def main() -> None:
        async with serving(sock_dir, Service()) as (_, path):
            client = await Client.connect(path)
            with pytest.raises(ConnectionClosed):
                await client.call(SVC, "Echo", b"")
            await client.close()
        async with serving(sock_dir, Service(), require_same_uid=False) as (_, path):
            client = await Client.connect(path)
            assert await client.call(SVC, "Echo", b"ok") == b"ok"
            await client.close()

    with caplog.at_level(logging.WARNING, logger="kybernate.shim.ttrpc"):
        arun(main())
    refused = [r for r in caplog.records if r.getMessage() == "refused connection from another user"]
    assert len(refused) == 1 and refused[0].fields["pid"] == 4242  # type: ignore[attr-defined]


def test_real_peer_credentials_are_our_own():
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert server_module.peer_credentials(left) == (os.getpid(), os.geteuid(), os.getegid())


def test_cancelling_serve_socket_drops_its_connections(arun, sock_dir):
    async def main() -> None:
        service = Service()
        path = os.path.join(sock_dir, "c.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        server = Server(service.handle)
        serving_task = asyncio.create_task(server.serve_socket(listener))
        client = await Client.connect(path)
        wait = asyncio.create_task(client.call(SVC, "Sleep", b""))
        await service.started.wait()
        serving_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving_task
        assert listener.fileno() == -1 and server.connections == 0 and service.cancelled == ["Sleep"]
        with pytest.raises(ConnectionClosed):
            await wait
        await client.close()
        server.close()
        await server.wait_closed()

    arun(main())


def test_a_listener_that_cannot_accept_raises_its_error(arun):
    async def main() -> None:
        not_listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server = Server(Service().handle)
        with pytest.raises(OSError):
            await server.serve_socket(not_listening)
        assert not_listening.fileno() == -1
        server.close()
        await server.wait_closed()

    arun(main())


def test_connection_reports_its_end_even_when_closed_before_the_reader_ran(arun):
    async def main() -> None:
        left, right = socket.socketpair(socket.AF_UNIX)
        reasons: list[BaseException | None] = []

        def on_frame(event: object) -> None:
            raise AssertionError("no frames expected")

        conn = await from_socket(left, name="t")
        conn.start(on_frame, reasons.append)
        conn.close()  # before the reader task ever ran
        await conn.wait_closed()
        assert reasons == [None] and conn.closed
        with pytest.raises(ConnectionClosed):
            await conn.send(lambda: Frame(1, FrameType.REQUEST))
        right.close()

    arun(main())
