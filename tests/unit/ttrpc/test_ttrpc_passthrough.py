"""Calls passed through without a task (Server pass_through, Client.call_now, Upstream.forward_now), on real
unix sockets: a front server that passes calls on to a back server, as the shim passes them to its child."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from harness.sockets import serve

from kybernate.shim.ttrpc.client import Client
from kybernate.shim.ttrpc.errors import Code, ConnectionClosed, TTRPCError
from kybernate.shim.ttrpc.protocol import Response
from kybernate.shim.ttrpc.server import Answer, Call, Server
from kybernate.shim.upstream import TASK_V2, TASK_V3, Upstream

SVC = TASK_V2


class Back:
    """The server calls are passed on to: echoes, fails with a status, or waits until released."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    async def handle(self, call: Call) -> bytes:
        self.calls.append(call)
        if call.method == "Fail":
            raise TTRPCError(Code.NOT_FOUND, "no such task", (b"\x0a\x01x",))
        if call.method == "Wait":
            self.waiting.set()
            await self.release.wait()
        return b"back:" + call.payload


class Front:
    """The handler a front server falls back to, and its pass-through (methods named Slow go to the handler)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.handled: list[str] = []
        self.passed: list[str] = []

    async def handle(self, call: Call) -> bytes:
        self.handled.append(call.method)
        return await self.upstream.forward(call)

    def pass_through(self, call: Call, answer: Answer) -> Callable[[], None] | None:
        if call.method == "Slow":
            return None
        if call.method == "Boom":
            raise RuntimeError("a bug in the pass-through")

        def answered(result: Response | Exception) -> None:
            answer(result if isinstance(result, Response) else Response.from_error(
                result if isinstance(result, TTRPCError) else TTRPCError(Code.INTERNAL, str(result))))

        forget = self.upstream.forward_now(call, answered)
        if forget is not None:
            self.passed.append(call.method)
        return forget


@asynccontextmanager
async def chain(sock_dir: str, task_api: int = 2) -> AsyncIterator[tuple[Back, Front, Server, Server, str]]:
    back, back_path, front_path = Back(), os.path.join(sock_dir, "back.sock"), os.path.join(sock_dir, "front.sock")
    back_server = Server(back.handle)
    back_task = await serve(back_server, back_path)
    upstream = await Upstream.connect(back_path, task_api)
    front = Front(upstream)
    front_server = Server(front.handle, pass_through=front.pass_through)
    front_task = await serve(front_server, front_path)
    try:
        yield back, front, front_server, back_server, front_path
    finally:
        for server in (front_server, back_server):
            server.close()
            await server.wait_closed()
        await asyncio.gather(front_task, back_task)
        await upstream.close()


def test_passed_calls_carry_everything_and_answer_as_the_handler_would(arun, sock_dir):
    async def main() -> None:
        async with chain(sock_dir) as (back, front, front_server, _, path):
            client = await Client.connect(path)
            meta = (("containerd-namespace-ttrpc", "ns"), ("k", "1"), ("k", "2"))
            assert await client.call(SVC, "State", b"x", metadata=meta, timeout_nano=30 * 10**9) == b"back:x"
            with pytest.raises(TTRPCError) as failed:
                await client.call(SVC, "Fail", b"")
            assert (failed.value.code, failed.value.message, failed.value.details) == (
                Code.NOT_FOUND, "no such task", (b"\x0a\x01x",))
            assert await client.call(SVC, "Slow", b"y") == b"back:y"  # declined: the handler forwards it
            assert front.passed == ["State", "Fail"] and front.handled == ["Slow"]
            state = back.calls[0]
            assert (state.method, state.payload, state.metadata, state.timeout_nano) == (
                "State", b"x", meta, 30 * 10**9)
            assert front_server.in_flight == 0 and front_server.budget.used_small == 0
            await client.close()

    arun(main())


def test_a_passed_call_reaches_a_v3_child_under_the_v3_service_with_all_else_as_it_came(arun, sock_dir):
    async def main() -> None:
        async with chain(sock_dir, task_api=3) as (back, front, _, _, path):
            client = await Client.connect(path)
            meta = (("containerd-namespace-ttrpc", "ns"),)
            assert await client.call(SVC, "State", b"x", metadata=meta, timeout_nano=30 * 10**9) == b"back:x"
            assert await client.call(TASK_V3, "State", b"y", metadata=meta) == b"back:y"
            assert front.passed == ["State", "State"]
            assert [(c.service, c.method, c.payload, c.metadata, c.timeout_nano) for c in back.calls] == [
                (TASK_V3, "State", b"x", meta, 30 * 10**9), (TASK_V3, "State", b"y", meta, 0)]
            await client.close()

    arun(main())


def test_many_passed_calls_at_once_each_get_their_own_answer(arun, sock_dir):
    async def main() -> None:
        async with chain(sock_dir) as (_, front, front_server, _, path):
            client = await Client.connect(path)
            payloads = [str(i).encode() * (i % 7 + 1) for i in range(200)]
            answers = await asyncio.gather(*(client.call(SVC, "Echo", p) for p in payloads))
            assert answers == [b"back:" + p for p in payloads]
            assert len(front.passed) == 200 and front_server.in_flight == 0
            await client.close()

    arun(main())


def test_a_passed_call_past_its_deadline_is_deadline_exceeded_and_the_late_answer_dropped(arun, sock_dir):
    async def main() -> None:
        async with chain(sock_dir) as (back, front, front_server, _, path):
            client = await Client.connect(path)
            with pytest.raises(TTRPCError) as late:
                await client.call(SVC, "Wait", b"", timeout_nano=50_000_000)
            assert (late.value.code, late.value.message) == (Code.DEADLINE_EXCEEDED, "deadline exceeded")
            assert front.passed == ["Wait"] and front_server.in_flight == 0
            back.release.set()  # the back answers now, to a call the front forgot
            assert await client.call(SVC, "Echo", b"z") == b"back:z"  # and the connections go on
            assert front.upstream._client._pending == {}
            await client.close()

    arun(main())


def test_a_client_leaving_forgets_its_passed_calls(arun, sock_dir):
    async def main() -> None:
        async with chain(sock_dir) as (back, front, front_server, _, path):
            client = await Client.connect(path)
            waiting = asyncio.create_task(client.call(SVC, "Wait", b""))
            await back.waiting.wait()
            assert front_server.in_flight == 1
            await client.close()
            with pytest.raises(ConnectionClosed):
                await waiting
            assert await front_server.drain(5.0)  # the front saw the EOF and dropped the call
            assert front.upstream._client._pending == {}
            assert front_server.budget.used_small == 0
            back.release.set()

    arun(main())


def test_a_passed_call_whose_upstream_goes_away_is_unavailable(arun, sock_dir):
    async def main() -> None:
        async with chain(sock_dir) as (back, front, front_server, back_server, path):
            client = await Client.connect(path)
            waiting = asyncio.create_task(client.call(SVC, "Wait", b""))
            await back.waiting.wait()
            back_server.close()  # the child exits
            with pytest.raises(TTRPCError) as gone:
                await waiting
            assert (gone.value.code, gone.value.message) == (Code.UNAVAILABLE, "the runc shim closed its connection")
            assert front_server.in_flight == 0
            # Nothing can be sent upstream now: the pass-through declines and the handler's forward answers.
            with pytest.raises(TTRPCError) as still:
                await client.call(SVC, "State", b"")
            assert still.value.code == Code.UNAVAILABLE and front.handled == ["State"]
            await client.close()

    arun(main())


def test_a_negative_deadline_never_reaches_the_pass_through(arun, sock_dir):
    async def main() -> None:
        async with chain(sock_dir) as (back, front, _, _, path):
            client = await Client.connect(path)
            with pytest.raises(TTRPCError) as expired:
                await client.call(SVC, "State", b"", timeout_nano=-1)
            assert expired.value.code == Code.DEADLINE_EXCEEDED
            assert front.passed == [] and back.calls == []
            await client.close()

    arun(main())


def test_every_call_gets_its_debug_log_line_passed_through_or_not(arun, sock_dir, caplog):
    async def main() -> None:
        async with chain(sock_dir) as (_, front, _, _, path):
            client = await Client.connect(path)
            await client.call(SVC, "State", b"")
            await client.call(SVC, "Slow", b"")
            with pytest.raises(TTRPCError):
                await client.call(SVC, "Fail", b"")
            assert front.passed == ["State", "Fail"] and front.handled == ["Slow"]
            await client.close()

    with caplog.at_level(logging.DEBUG, logger="kybernate.shim.ttrpc.server"):
        arun(main())
    lines = [(r.fields["rpc"], r.fields["code"]) for r in caplog.records  # type: ignore[attr-defined]
             if r.name == "kybernate.shim.ttrpc.server" and r.msg == "call" and "ms" in r.fields]
    # One line from the front (passed through or handled) and one from the back, for each call.
    assert sorted(lines) == sorted([(f"{SVC}/State", "OK"), (f"{SVC}/Slow", "OK"), (f"{SVC}/Fail", "NOT_FOUND")] * 2)


def test_a_pass_through_that_fails_leaves_the_call_to_the_handler_and_the_connection_up(arun, sock_dir, caplog):
    async def main() -> None:
        async with chain(sock_dir) as (_, front, _, _, path):
            client = await Client.connect(path)
            assert await client.call(SVC, "Boom", b"b") == b"back:b"
            assert await client.call(SVC, "State", b"s") == b"back:s"
            assert front.handled == ["Boom"] and front.passed == ["State"]
            await client.close()

    arun(main())
    assert "pass-through failed" in caplog.text
