"""A ttrpc client on a unix socket: many concurrent calls over one connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from .address import socket_path
from .connection import Connection, open_unix
from .errors import Code, ConnectionClosed, TTRPCError
from .frames import Event, Frame
from .protocol import ClientProtocol, Ignored, Request, Response, ResponseReceived, encode_request

log = logging.getLogger(__name__)

# Called once with the peer's Response, or the error that ended the call: a TTRPCError or ProtocolError for
# an answer that cannot be used, ConnectionClosed when the connection went down first.
OnAnswer = Callable[[Response | Exception], None]


class Client:
    """Use `await Client.connect(path)`. Calls may run concurrently; each waits on its own stream."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._protocol = ClientProtocol()
        # Calls waiting for their answer, by stream: a future (call_raw) or a callback (call_now).
        self._pending: dict[int, asyncio.Future[Response] | OnAnswer] = {}
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

    def call_now(
        self,
        service: str,
        method: str,
        payload: bytes,
        on_answer: OnAnswer,
        *,
        metadata: Iterable[tuple[str, str]] = (),
        timeout_nano: int = 0,
    ) -> int | None:
        """Send a call without waiting for anything; `on_answer` gets its end (see OnAnswer), called
        synchronously as the answer is read. Returns the call's stream id (for forget()), or None when it
        cannot be sent at once (the connection is closed or the peer is behind, or the request is over
        4 MiB): call_raw then waits, or raises the error."""
        if not self._conn.writable:
            return None
        return self.call_now_encoded(encode_request(Request(service, method, payload, timeout_nano, tuple(metadata))),
                                     on_answer)

    def call_now_encoded(self, body: bytes, on_answer: OnAnswer) -> int | None:
        """call_now() for a request already encoded (one passed on as it came)."""
        if not self._conn.writable:
            return None
        try:
            frame = self._conn.send_now(lambda: self._protocol.encoded_request_frame(body))
        except (TTRPCError, ConnectionClosed):
            return None
        self._pending[frame.stream_id] = on_answer
        return frame.stream_id

    def forget(self, stream_id: int) -> None:
        """Stop waiting for a call_now's answer (no cancel frame exists: a late answer is dropped)."""
        self._pending.pop(stream_id, None)

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
        waiter = self._pending.pop(event.stream_id, None)
        if waiter is None or isinstance(waiter, asyncio.Future) and waiter.done():
            log.debug("answer for a call that gave up", extra={"fields": {"conn": self._conn.name,
                                                                          "stream": event.stream_id}})
            return
        result: Response | Exception = event.response if isinstance(event, ResponseReceived) else event.error
        if not isinstance(waiter, asyncio.Future):
            self._answer(waiter, result)
        elif isinstance(result, Response):
            waiter.set_result(result)
        else:
            waiter.set_exception(result)

    def _on_closed(self, reason: BaseException | None) -> None:
        pending, self._pending = self._pending, {}
        for waiter in pending.values():
            if isinstance(waiter, asyncio.Future) and waiter.done():
                continue
            error = ConnectionClosed(f"connection {self._conn.name} closed before the answer arrived")
            error.__cause__ = reason
            if isinstance(waiter, asyncio.Future):
                waiter.set_exception(error)
            else:
                self._answer(waiter, error)

    def _answer(self, on_answer: OnAnswer, result: Response | Exception) -> None:
        try:
            on_answer(result)
        except Exception:  # the owner's bug must not take the connection down with it
            log.exception("answer callback failed", extra={"fields": {"conn": self._conn.name}})
