"""A ttrpc client on a unix socket: many concurrent calls over one connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from .address import socket_path
from .connection import Connection, open_unix
from .errors import Code, ConnectionClosed, TTRPCError
from .frames import Event, Frame
from .protocol import ClientProtocol, Ignored, Request, Response, ResponseReceived, StreamFailed

log = logging.getLogger(__name__)


class Client:
    """Use `await Client.connect(path)`. Calls may run concurrently; each waits on its own stream."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._protocol = ClientProtocol()
        # Written under the connection's write lock together with the id; read by the reader task.
        self._pending: dict[int, asyncio.Future[Response]] = {}
        conn.start(self._on_frame, self._on_closed)

    @classmethod
    async def connect(cls, path: str) -> Client:
        """Connect to "unix:///x" or "/x"; OSError if nobody listens there."""
        return cls(await open_unix(socket_path(path), name=f"client {path}"))

    @property
    def closed(self) -> bool:
        return self._conn.closed

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        metadata: Iterable[tuple[str, str]] = (),
        timeout_nano: int = 0,
        timeout: float | None = None,
    ) -> bytes:
        """The response payload; TTRPCError for a non-OK status (the peer's, or one of the local
        failures call_raw raises), ConnectionClosed if the connection is or goes down first."""
        response = await self.call_raw(
            service, method, payload, metadata=metadata, timeout_nano=timeout_nano, timeout=timeout
        )
        error = response.error()
        if error is not None:
            raise error
        return response.payload

    async def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        metadata: Iterable[tuple[str, str]] = (),
        timeout_nano: int = 0,
        timeout: float | None = None,
    ) -> Response:
        """The peer's response, whatever its status, untouched.

        `timeout_nano` is the deadline sent to the peer (0: none). `timeout` (seconds) is how long we
        wait; when given without timeout_nano it is sent as the deadline too. Raised locally:
        TTRPCError(DEADLINE_EXCEEDED) when `timeout` passes, TTRPCError(RESOURCE_EXHAUSTED) for a
        request or response over 4 MiB, ProtocolError for a response that is not a ttrpc Response,
        ConnectionClosed when the connection is or goes down before the answer.
        """
        if timeout is not None and timeout_nano == 0:
            timeout_nano = max(1, int(timeout * 1e9))
        request = Request(service, method, payload, timeout_nano, tuple(metadata))
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        stream_id = 0

        def open_stream() -> Frame:
            nonlocal stream_id
            frame = self._protocol.request_frame(request)
            stream_id = frame.stream_id
            self._pending[stream_id] = future
            return frame

        deadline = asyncio.timeout(timeout) if timeout is not None else None
        try:
            if deadline is None:  # no timer to arm
                await self._conn.send(open_stream)
                return await future
            async with deadline:
                await self._conn.send(open_stream)
                return await future
        except TimeoutError:
            if deadline is not None and deadline.expired():
                raise TTRPCError(
                    Code.DEADLINE_EXCEEDED, f"no answer to {service}/{method} within {timeout} s"
                ) from None
            raise
        finally:
            # No cancel frame exists: a call that gives up just forgets its stream.
            self._pending.pop(stream_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved, even when nobody awaited it

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with ConnectionClosed."""
        self._conn.close()
        await self._conn.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the connection is down, for whatever reason (our close, EOF, reset)."""
        await self._conn.wait_closed()

    def _on_frame(self, frame: Event) -> None:
        event = self._protocol.receive(frame)  # a ProtocolError drops the connection
        if isinstance(event, Ignored):
            log.debug("ignored frame", extra={"fields": {"conn": self._conn.name, "stream": event.stream_id,
                                                         "reason": event.reason}})
            return
        future = self._pending.pop(event.stream_id, None)
        if future is None or future.done():
            log.debug("answer for a call that gave up", extra={"fields": {"conn": self._conn.name,
                                                                          "stream": event.stream_id}})
            return
        if isinstance(event, ResponseReceived):
            future.set_result(event.response)
        elif isinstance(event, StreamFailed):
            future.set_exception(event.error)

    def _on_closed(self, reason: BaseException | None) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                error = ConnectionClosed(f"connection {self._conn.name} closed before the answer arrived")
                error.__cause__ = reason
                future.set_exception(error)
