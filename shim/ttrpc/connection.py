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
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, name: str) -> None:
        self.name = name  # for logs: "server#3", "client /run/x.sock"
        self._reader = reader
        self._writer = writer
        self._decoder = FrameDecoder()
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
        self._writer.close()
        try:
            on_closed(self.close_reason)
        except Exception:
            log.exception("connection close callback failed", extra={"fields": {"conn": self.name}})
