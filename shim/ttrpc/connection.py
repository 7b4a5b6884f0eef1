"""The asyncio adapter under client and server: a reader task feeding a FrameDecoder, one write lock.

What a frame means is the owner's business (`on_frame`); this module moves bytes, serializes writes so
frames never interleave, and closes once: on EOF, a reset, a protocol violation, or close().
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from .errors import ConnectionClosed, ProtocolError
from .frames import Event, Frame, FrameDecoder, encode_frame
from .limits import BufferBudget

log = logging.getLogger(__name__)

READ_CHUNK = 256 << 10  # bytes per read; also the StreamReader's buffer limit
CLOSE_TIMEOUT_S = 1.0  # how long close waits for queued bytes to reach a peer that does not read

OnFrame = Callable[[Event], Awaitable[None]]  # may raise ProtocolError to drop the connection
OnClosed = Callable[[BaseException | None], None]  # the reason: None for a clean EOF or close()


async def open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path, limit=READ_CHUNK)


async def from_socket(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an already connected (accepted) socket."""
    return await asyncio.open_unix_connection(sock=sock, limit=READ_CHUNK)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, name: str,
                 budget: BufferBudget | None = None) -> None:
        self.name = name  # for logs: "server#3", "client /run/x.sock"
        self._reader = reader
        self._writer = writer
        # With a budget, each frame's declared bytes are reserved when its header arrives and released
        # when the frame is handed to on_frame; a frame that does not fit is skipped, not buffered.
        self._budget = budget
        self.held = 0  # bytes this connection holds in the budget: its frame being assembled, and
        #               whatever its owner reserved through reserve() (a running request's payload)
        self._decoder = FrameDecoder(admit=self._admit if budget is not None else None)
        self._write_lock = asyncio.Lock()  # held from building a frame until the socket took it (drain)
        self._reader_task: asyncio.Task[None] | None = None
        self._closing = False
        self.close_reason: BaseException | None = None

    @property
    def closed(self) -> bool:
        """True once the connection stopped (or is stopping): nothing more can be sent."""
        return self._closing or self._writer.is_closing()

    def start(self, on_frame: OnFrame, on_closed: OnClosed) -> None:
        """Start the reader task. `on_closed` is called exactly once, when it ends for any reason."""
        if self._reader_task is not None:
            raise RuntimeError("connection already started")
        task = asyncio.create_task(self._read(on_frame), name=f"ttrpc-reader {self.name}")
        # A done-callback, not a finally: it also runs when the task is cancelled before it first ran.
        task.add_done_callback(lambda _: self._finish(on_closed))
        self._reader_task = task

    async def send(self, build: Callable[[], Frame]) -> Frame:
        """Write the frame `build()` returns; build runs under the write lock, so ids allocated there
        go out in order. ConnectionClosed if the connection is gone; errors of build propagate."""
        async with self._write_lock:
            if self.closed:
                raise ConnectionClosed(f"connection {self.name} is closed")
            frame = build()
            data = encode_frame(frame)
            try:
                # write() queues the whole frame at once: a cancelled drain never leaves half a frame.
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as err:
                raise ConnectionClosed(f"connection {self.name} lost while writing: {err}") from err
        return frame

    def close(self) -> None:
        """Stop reading and close the socket once the frames already queued are written."""
        self._closing = True
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._writer.close()

    async def wait_closed(self) -> None:
        """Wait until the reader has stopped and the socket is closed (bounded by CLOSE_TIMEOUT_S)."""
        if self._reader_task is not None:
            await asyncio.wait([self._reader_task])
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._writer.wait_closed()
        except TimeoutError:
            log.warning("peer does not read; dropping unsent bytes", extra={"fields": {"conn": self.name}})
            self._writer.transport.abort()
        except (ConnectionError, OSError):
            pass  # the peer reset the connection: closed either way

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

    async def _read(self, on_frame: OnFrame) -> None:
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    if self._decoder.buffered or self._decoder.discarding:
                        self.close_reason = ConnectionClosed(f"connection {self.name}: EOF in the middle of a frame")
                        log.warning("peer closed mid-frame", extra={"fields": {"conn": self.name}})
                    else:
                        log.debug("peer closed", extra={"fields": {"conn": self.name}})
                    return
                self._decoder.feed(data)
                for event in self._decoder:
                    if isinstance(event, Frame):
                        # Handed on: the owner reserves again what it keeps (a request's payload).
                        self.release(len(event.payload))
                    await on_frame(event)
        except ProtocolError as err:
            self.close_reason = err
            log.error("protocol violation, closing connection", extra={"fields": {"conn": self.name, "error": err}})
        except (ConnectionError, OSError) as err:
            self.close_reason = err
            log.info("connection lost", extra={"fields": {"conn": self.name, "error": err}})
        except Exception as err:
            self.close_reason = err
            log.exception("connection reader failed", extra={"fields": {"conn": self.name}})

    def _finish(self, on_closed: OnClosed) -> None:
        self._closing = True
        # A frame cut off by the end: its reservation goes with it (the owner releases its own).
        self.release(self._decoder.admitted_bytes)
        self._writer.close()
        try:
            on_closed(self.close_reason)
        except Exception:
            log.exception("connection close callback failed", extra={"fields": {"conn": self.name}})
