"""The server's caps on connections, requests in flight and buffered bytes, on real unix sockets.

Before them, 300 connections each holding a 4 MiB frame minus one byte grew a shim to 1.76 GB.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from test_ttrpc_sockets import RawPeer, Service, header, serving

from kybernate.shim.ttrpc.errors import Code
from kybernate.shim.ttrpc.frames import HEADER_LENGTH, MAX_MESSAGE_LENGTH, FrameType
from kybernate.shim.ttrpc.limits import BufferBudget, Limits
from kybernate.shim.ttrpc.protocol import Response, decode_response
from kybernate.shim.ttrpc.server import Server

ALMOST = MAX_MESSAGE_LENGTH - 1  # the frame each peer declares; it first sends all but one byte


async def until(condition: Callable[[], bool]) -> None:
    """Wait for server state to reach `condition` (the run's watchdog bounds it)."""
    while not condition():
        await asyncio.sleep(0.01)


def held_by_decoders(server: Server) -> int:
    """What the server's connections really buffer, beside what the budget counts."""
    return sum(c._conn._decoder.buffered for c in server._connections if c._conn is not None)


def logged(caplog: pytest.LogCaptureFixture, message: str) -> int:
    return sum(1 for r in caplog.records if r.getMessage() == message)


async def answers_until(peer: RawPeer, last: int) -> dict[int, Response]:
    out: dict[int, Response] = {}
    while last not in out:
        frame = await peer.frame()
        assert frame is not None, "connection closed"
        out[frame.stream_id] = decode_response(frame.payload)
    return out


def test_300_connections_holding_almost_full_frames_stay_within_the_caps(arun, sock_dir, caplog):
    caplog.set_level(logging.WARNING)
    limits = Limits()
    admitted = limits.max_buffered_total // ALMOST  # frames of this size the total cap holds at once

    async def attack(peer: RawPeer) -> RawPeer | None:
        try:
            await peer.send(header(ALMOST, 1, FrameType.REQUEST) + bytes(ALMOST - 1))
        except (ConnectionError, OSError):
            peer.writer.transport.abort()  # refused at accept: the server closed it
            return None
        return peer

    async def main() -> None:
        async with serving(sock_dir, Service()) as (server, path):
            # One after the other, so that none is lost to a full listen backlog before the server sees it.
            connected = [await RawPeer.connect(path) for _ in range(300)]
            peers = [p for p in await asyncio.gather(*(attack(p) for p in connected)) if p is not None]
            assert len(peers) == limits.max_connections
            await until(lambda: logged(caplog, "refused connection: too many open") == 300 - limits.max_connections)
            assert server.connections == limits.max_connections
            await until(lambda: logged(caplog, "frame refused: buffer cap; its body is skipped")
                        == limits.max_connections - admitted)
            await until(lambda: held_by_decoders(server) == admitted * (ALMOST - 1) + admitted * 10)
            # The bound: what is counted, and what the decoders really hold.
            assert server.budget.used == admitted * ALMOST
            assert server.budget.peak <= limits.max_buffered_total + limits.max_buffered_small
            # Headers are not counted: 10 bytes per connection on top.
            assert held_by_decoders(server) <= limits.max_buffered_total + limits.max_connections * HEADER_LENGTH
            # Every connection goes on: the last byte completes each frame (a refused one was skipped
            # and answered RESOURCE_EXHAUSTED from its header; an admitted one is no Request), and the
            # next request is served.
            codes = []
            for peer in peers:
                await peer.send(b"\x00")
                await peer.request(3, "Echo", b"after")
                got = await answers_until(peer, 3)
                assert got[3] == Response(payload=b"after")
                codes.append(got[1].status_code)
            assert sorted(codes).count(Code.RESOURCE_EXHAUSTED) == limits.max_connections - admitted
            assert sorted(codes).count(Code.INVALID_ARGUMENT) == admitted
            for peer in peers:
                await peer.close()
            await until(lambda: server.connections == 0)
            assert (server.budget.used, server.budget.used_small) == (0, 0)  # nothing leaked from the count
            peer = await RawPeer.connect(path)
            await peer.request(1, "Echo", b"ok")
            assert await answers_until(peer, 1) == {1: Response(payload=b"ok")}
            await peer.close()

    arun(main(), 60)


def test_requests_in_flight_per_connection_are_capped(arun, sock_dir, caplog):
    service = Service()

    async def main() -> None:
        async with serving(sock_dir, service, limits=Limits(max_requests_per_connection=2)) as (server, path):
            peer = await RawPeer.connect(path)
            await peer.request(1, "Wait")
            await peer.request(3, "Wait")
            await peer.request(5, "Echo", b"third")
            stream_id, response = await peer.response()
            assert stream_id == 5 and response.status_code == Code.RESOURCE_EXHAUSTED
            assert "2 requests already in flight on this connection" in response.status_message
            assert server.in_flight == 2
            service.release.set()
            assert {(await peer.response())[0] for _ in range(2)} == {1, 3}
            await peer.request(7, "Echo", b"again")
            assert await peer.response() == (7, Response(payload=b"again"))
            await peer.close()

    arun(main())


def test_a_running_request_payload_counts_against_its_connection(arun, sock_dir):
    service = Service()
    limits = Limits(max_buffered_per_connection=1000, max_buffered_total=1500, small_frame=100, max_buffered_small=300)

    async def main() -> None:
        async with serving(sock_dir, service, limits=limits) as (server, path):
            peer = await RawPeer.connect(path)
            other = await RawPeer.connect(path)
            await peer.request(1, "Wait", bytes(600))
            await until(lambda: server.in_flight == 1)
            assert server.budget.used == 600
            await peer.request(3, "Echo", bytes(600))  # 1200 on this connection: over its cap
            stream_id, response = await peer.response()
            assert stream_id == 3 and response.status_code == Code.RESOURCE_EXHAUSTED
            assert "buffer cap of 1000 bytes" in response.status_message
            await other.request(1, "Echo", bytes(950))  # 1550 on the server: over the total
            stream_id, response = await other.response()
            assert stream_id == 1 and "total buffer cap of 1500 bytes" in response.status_message
            # Small messages have a pool of their own: still served while the large one is spent.
            await other.request(3, "Echo", bytes(50))
            assert await other.response() == (3, Response(payload=bytes(50)))
            service.release.set()
            assert (await peer.response())[0] == 1
            await until(lambda: (server.budget.used, server.budget.used_small) == (0, 0))
            await peer.close()
            await other.close()

    arun(main())


def test_budget_refuses_past_either_cap_and_counts_back() -> None:
    budget = BufferBudget(Limits(max_buffered_per_connection=10, max_buffered_total=15, small_frame=2,
                                 max_buffered_small=3))
    assert budget.take(10, 0) is None
    assert "connection over its buffer cap of 10 bytes" in (budget.take(3, 10) or "")
    assert "total buffer cap of 15 bytes" in (budget.take(6, 0) or "")
    assert budget.take(5, 0) is None
    assert budget.take(2, 0) is None  # small: its own pool
    assert "buffer cap of 3 bytes for small messages" in (budget.take(2, 0) or "")
    budget.give(10)
    budget.give(5)
    budget.give(2)
    assert (budget.used, budget.used_small, budget.peak) == (0, 0, 17)
    with pytest.raises(ValueError):
        Limits(max_buffered_per_connection=20, max_buffered_total=10)


def test_a_handler_sees_the_deadline_the_server_enforces(arun, sock_dir):
    """Call.deadline is what handlers hand on to calls of their own (the shim: to kybernate-hookd)."""
    from kybernate.shim.ttrpc.client import Client

    seen: list[tuple[float | None, float]] = []

    class Deadlines(Service):
        async def handle(self, call):  # type: ignore[no-untyped-def]
            seen.append((call.deadline, asyncio.get_running_loop().time()))
            return b""

    async def main() -> None:
        async with serving(sock_dir, Deadlines()) as (_, path):
            client = await Client.connect(path)
            await client.call("containerd.task.v2.Task", "Pause", b"", timeout_nano=30 * 10**9)
            await client.call("containerd.task.v2.Task", "Pause", b"")
            await client.close()

    arun(main())
    (with_deadline, at), (without, _) = seen
    assert with_deadline is not None and 29 < with_deadline - at <= 30
    assert without is None
