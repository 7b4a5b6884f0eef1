"""The asyncio adapter under client and server: a Protocol feeding a FrameDecoder, writes that never interleave.

What a frame means is the owner's business (`on_frame`, called synchronously for each frame as the
bytes arrive: no reader task, no stream buffer in between); this module moves bytes, keeps frames whole
on the wire, applies flow control and closes once: on EOF, a reset, a protocol violation, or close().

Writes: a frame is built and handed to the transport in one synchronous step, so frames never
interleave and ids allocated while building reach the wire in order. While the transport's buffer is
above its high-water mark (the peer reads slower than we write), senders queue on a lock and each waits
for the buffer to drain before it writes, so a connection holds at most the high-water mark plus one
frame. A server connection (`backpressure`) also stops dispatching and reading the peer's frames while
its answers cannot be written: a peer that does not read gets nothing more read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

from .errors import ConnectionClosed, ProtocolError
from .frames import Event, Frame, FrameDecoder, encode_frame
from .limits import BufferBudget

log = logging.getLogger(__name__)

READ_CHUNK = 256 << 10  # the most one read hands over (asyncio's transports read this much at a time)
CLOSE_TIMEOUT_S = 1.0  # how long close waits for queued bytes to reach a peer that does not read

OnFrame = Callable[[Event], None]  # may raise ProtocolError to drop the connection
OnClosed = Callable[[BaseException | None], None]  # the reason: None for a clean EOF or close()


async def open_unix(path: str, *, name: str, budget: BufferBudget | None = None,
                    backpressure: bool = False) -> Connection:
    """A connection to the unix socket at `path` (a plain path); OSError if nobody listens there."""
    loop = asyncio.get_running_loop()
    conn = Connection(name=name, budget=budget, backpressure=backpressure)
    await loop.create_unix_connection(lambda: conn, path)
    return conn


async def from_socket(sock: socket.socket, *, name: str, budget: BufferBudget | None = None,
                      backpressure: bool = False) -> Connection:
    """A connection over an already connected (accepted) socket."""
    loop = asyncio.get_running_loop()
    conn = Connection(name=name, budget=budget, backpressure=backpressure)
    await loop.create_unix_connection(lambda: conn, sock=sock)
    return conn


class Connection(asyncio.Protocol):
    """Made by open_unix() or from_socket(); nothing is read until start()."""

    def __init__(self, *, name: str, budget: BufferBudget | None = None, backpressure: bool = False) -> None:
        self.name = name  # for logs: "server#3", "client /run/x.sock"
        # With a budget, each frame's declared bytes are reserved when its header arrives and released
        # when the frame is handed to on_frame; a frame that does not fit is skipped, not buffered.
        self._budget = budget
        self.held = 0  # bytes this connection holds in the budget: its frame being assembled, and
        #               whatever its owner reserved through reserve() (a running request's payload)
        self._decoder = FrameDecoder(admit=self._admit if budget is not None else None)
        self._backpressure = backpressure
        self._transport: asyncio.Transport | None = None
        self._on_frame: OnFrame | None = None
        self._on_closed: OnClosed | None = None
        self._write_lock = asyncio.Lock()  # senders that found the buffer full, in order
        self._paused = False  # the transport's buffer is above its high-water mark
        self._drained = asyncio.Event()  # set while not paused, and at the end
        self._drained.set()
        self._closing = False
        self._ended = asyncio.Event()  # set once the connection ended (on_closed called, if started)
        self._lost = asyncio.Event()  # set once the socket is closed
        self.close_reason: BaseException | None = None

    @property
    def closed(self) -> bool:
        """True once the connection stopped (or is stopping): nothing more can be sent."""
        return self._closing or self._transport is None or self._transport.is_closing()

    @property
    def writable(self) -> bool:
        """True while a frame can be written without waiting: open, and the peer keeps up."""
        return not self._paused and not self._write_lock.locked() and not self.closed

    def start(self, on_frame: OnFrame, on_closed: OnClosed) -> None:
        """Start reading. `on_closed` is called exactly once, when the connection ends for any reason."""
        if self._on_closed is not None:
            raise RuntimeError("connection already started")
        self._on_frame, self._on_closed = on_frame, on_closed
        if self._ended.is_set():  # it ended before it started (the peer left at once)
            asyncio.get_running_loop().call_soon(self._report, on_closed)
        elif self._transport is not None:
            self._dispatch()  # frames that arrived before (a loop may deliver bytes before pausing took)
            if not self._ended.is_set() and not (self._backpressure and self._paused):
                self._transport.resume_reading()

    async def send(self, build: Callable[[], Frame]) -> Frame:
        """Write the frame `build()` returns; build runs right before the write, so ids allocated there
        go out in order. ConnectionClosed if the connection is gone; errors of build propagate."""
        if self.writable:
            return self.send_now(build)  # the common case: no await at all
        async with self._write_lock:
            while self._paused and not self.closed:
                await self._drained.wait()
            return self.send_now(build)

    def send_now(self, build: Callable[[], Frame]) -> Frame:
        """Write at once, however full the buffer (send() waits for room; on_frame cannot wait)."""
        if self.closed:
            raise ConnectionClosed(f"connection {self.name} is closed")
        assert self._transport is not None
        frame = build()
        # One write per frame: the transport queues it whole, whatever happens to the sender after.
        self._transport.write(encode_frame(frame))
        return frame

    def close(self) -> None:
        """Stop reading and close the socket once the frames already queued are written."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        if not self._ended.is_set():
            asyncio.get_running_loop().call_soon(self._finish)

    async def wait_closed(self) -> None:
        """Wait until the connection has ended and its socket is closed; once it ended, queued bytes get
        CLOSE_TIMEOUT_S to reach the peer, then are dropped."""
        await self._ended.wait()
        if self._lost.is_set():
            return
        assert self._transport is not None
        self._transport.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._lost.wait()
        except TimeoutError:
            log.warning("peer does not read; dropping unsent bytes", extra={"fields": {"conn": self.name}})
            self._transport.abort()
            await self._lost.wait()

    def reserve(self, size: int) -> str | None:
        """Count `size` more bytes against this connection and the server; None if they fit, else why not."""
        if self._budget is None:
            return None
        refused = self._budget.take(size, self.held)
        if refused is None:
            self.held += size
        return refused

    def release(self, size: int) -> None:
        if self._budget is not None:
            self.held -= size
            self._budget.give(size)

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream transport (not every loop's subclasses it)
        if self._on_frame is None:
            self._transport.pause_reading()  # until start(): nobody to hand frames to yet

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._dispatch()

    def eof_received(self) -> bool:
        if self._decoder.buffered or self._decoder.discarding:
            self.close_reason = ConnectionClosed(f"connection {self.name}: EOF in the middle of a frame")
            log.warning("peer closed mid-frame", extra={"fields": {"conn": self.name}})
        else:
            log.debug("peer closed", extra={"fields": {"conn": self.name}})
        self._finish()
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self._ended.is_set():
            self.close_reason = exc
            log.info("connection lost", extra={"fields": {"conn": self.name, "error": exc}})
        self._lost.set()
        self._finish()

    def pause_writing(self) -> None:
        self._paused = True
        self._drained.clear()
        if self._backpressure and self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        self._drained.set()
        if self._backpressure and self._on_frame is not None and not self.closed:
            self._dispatch()  # frames read before the pause
            if not self._paused and not self.closed:
                assert self._transport is not None
                self._transport.resume_reading()

    # --- internals ----------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand the complete frames to on_frame; with backpressure, stop while answers cannot be written."""
        on_frame = self._on_frame
        if on_frame is None:
            return  # not started: the frames wait in the decoder
        try:
            while not (self._backpressure and self._paused) and not self._ended.is_set():
                event = self._decoder.next_frame()
                if event is None:
                    return
                if isinstance(event, Frame):
                    # Handed on: the owner reserves again what it keeps (a request's payload).
                    self.release(len(event.payload))
                on_frame(event)
        except ProtocolError as err:
            self.close_reason = err
            log.error("protocol violation, closing connection", extra={"fields": {"conn": self.name, "error": err}})
            self._finish()
        except Exception as err:
            self.close_reason = err
            log.exception("connection reader failed", extra={"fields": {"conn": self.name}})
            self._finish()

    def _admit(self, length: int) -> str | None:
        # Complete frames still queued are on their way out: they do not count against this connection's
        # cap (two back-to-back frames may share a read), only against the server's.
        assert self._budget is not None
        refused = self._budget.take(length, self.held - self._decoder.queued_bytes)
        if refused is None:
            self.held += length
        else:
            log.warning("frame refused: buffer cap; its body is skipped",
                        extra={"fields": {"conn": self.name, "bytes": length, "why": refused}})
        return refused

    def _finish(self) -> None:
        """The end, once: release what the connection held, wake waiting senders, close, tell the owner."""
        if self._ended.is_set():
            return
        self._closing = True
        self._ended.set()
        self._drained.set()  # waiting senders find the connection closed
        # Frames cut off by the end, or read and not handed on: their reservations go with them.
        self.release(self._decoder.admitted_bytes)
        if self._transport is not None:
            self._transport.close()
        if self._on_closed is not None:
            self._report(self._on_closed)

    def _report(self, on_closed: OnClosed) -> None:
        try:
            on_closed(self.close_reason)
        except Exception:
            log.exception("connection close callback failed", extra={"fields": {"conn": self.name}})
