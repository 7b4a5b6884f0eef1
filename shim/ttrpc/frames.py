"""ttrpc framing, sans-I/O: a 10-byte header and a body; bytes in, frames out.

Header, big-endian: uint32 body length, uint32 stream id, uint8 type, uint8 flags. Bodies are at most
4 MiB. Because of that limit the first header byte is always zero; the protocol reserves it, and a
non-zero first byte is how we tell a stream of garbage from a merely oversized frame: garbage is a
ProtocolError (the connection is lost), a frame of 4 to 16 MiB is reported as an OversizedFrame and its
body is skipped so the connection goes on.

Frame types are passed through as numbers: which types are allowed, and on which side, is decided by
`protocol`, not here.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import FrameTooLarge, ProtocolError

HEADER = struct.Struct(">IIBB")
HEADER_LENGTH = HEADER.size  # 10
MAX_MESSAGE_LENGTH = 4 << 20  # bytes of body, header not counted
# A declared length above this sets the reserved first header byte.
_RESERVED_LENGTH = 0x00FF_FFFF
_MAX_STREAM_ID = 0xFFFF_FFFF


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    """Stream flags. A unary request carries none; requests with either of the first two are streams."""

    REMOTE_CLOSED = 0x1  # request/data: the sender will send no more data on this stream
    REMOTE_OPEN = 0x2  # request: the sender will send data frames after this request
    NO_DATA = 0x4  # data: the frame carries no body


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int  # a FrameType, or any other number a peer sent
    flags: int = 0
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose declared body exceeded the limit, or that the owner refused to buffer (`refused`
    says why); the body is being skipped, not buffered."""

    stream_id: int
    type: int
    length: int
    refused: str = ""


# Called with a frame's declared body length when its header is parsed: None to buffer the frame,
# or why not, to skip its body as it arrives (the caller's buffer cap).
Admit = Callable[[int], str | None]


Event = Frame | OversizedFrame


def encode_frame(frame: Frame) -> bytes:
    """Header and body; FrameTooLarge for a body over 4 MiB, ValueError for out-of-range header fields."""
    length = len(frame.payload)
    if length > MAX_MESSAGE_LENGTH:
        raise FrameTooLarge(length, MAX_MESSAGE_LENGTH)
    if not 0 <= frame.stream_id <= _MAX_STREAM_ID:
        raise ValueError(f"stream id {frame.stream_id} does not fit in 32 bits")
    if not (0 <= frame.type <= 0xFF and 0 <= frame.flags <= 0xFF):
        raise ValueError(f"frame type {frame.type} or flags {frame.flags} do not fit in 8 bits")
    return HEADER.pack(length, frame.stream_id, frame.type, frame.flags) + frame.payload


_FRAME_TYPES: dict[int, int] = {int(t): t for t in FrameType}  # a lookup: cheaper than the enum's constructor


def _frame_type(value: int) -> int:
    return _FRAME_TYPES.get(value, value)


class FrameDecoder:
    """Feed bytes as they arrive; take frames out with next_frame() or by iterating.

    Frames are parsed as soon as they are complete, so the body of an oversized frame is dropped as it
    is fed and never held. A ProtocolError is raised by next_frame() after the frames that preceded the
    bad header have been taken; from then on the decoder is dead and raises the same error.
    """

    def __init__(self, max_length: int = MAX_MESSAGE_LENGTH, admit: Admit | None = None) -> None:
        if not 0 <= max_length <= MAX_MESSAGE_LENGTH:
            raise ValueError(f"max_length must be between 0 and {MAX_MESSAGE_LENGTH}")
        self._max_length = max_length
        self._admit = admit
        self._admitted = 0  # declared body length of the admitted frame at the buffer's start, if any
        self._buffer = bytearray()
        self._discard = 0  # body bytes of an oversized frame still to drop
        self._events: deque[Event] = deque()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (non-zero at EOF means the peer stopped mid-frame)."""
        return len(self._buffer)

    @property
    def admitted_bytes(self) -> int:
        """Bytes `admit` accepted that were not taken out yet: the incomplete frame's declared body and
        the bodies of complete frames still queued (with an `admit` hook every buffered frame was admitted)."""
        return self._admitted + self.queued_bytes

    @property
    def queued_bytes(self) -> int:
        """Body bytes of complete frames not taken out yet."""
        if not self._events:  # the common case: asked as a new frame's header is read
            return 0
        return sum(len(e.payload) for e in self._events if isinstance(e, Frame))

    @property
    def discarding(self) -> int:
        """Body bytes of an oversized frame still to be skipped."""
        return self._discard

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            return
        if self._discard:
            skipped = min(self._discard, len(data))
            self._discard -= skipped
            data = memoryview(data)[skipped:]
        if not len(data):
            return
        buffer = self._buffer
        if buffer:  # the rest of a frame begun in an earlier read
            buffer += data
            del buffer[:self._parse(buffer)]
        else:  # the common case: parse the read itself, keep only an incomplete tail
            parsed = self._parse(data)
            if parsed < len(data):
                buffer += memoryview(data)[parsed:]

    def next_frame(self) -> Event | None:
        """The next complete frame or oversized-frame event; None when more bytes are needed."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return None

    def __iter__(self) -> Iterator[Event]:
        while (event := self.next_frame()) is not None:
            yield event

    def _parse(self, data: bytes | bytearray | memoryview) -> int:
        """Take the complete frames out of `data`; returns how many of its bytes were used."""
        pos = 0
        size = len(data)
        events = self._events
        while True:
            if self._discard:
                skipped = min(self._discard, size - pos)
                self._discard -= skipped
                pos += skipped
                if self._discard:
                    return pos
            if size - pos < HEADER_LENGTH:
                return pos
            length, stream_id, type_, flags = HEADER.unpack_from(data, pos)
            if length > _RESERVED_LENGTH:
                self._error = ProtocolError(
                    f"bad frame header {bytes(data[pos:pos + HEADER_LENGTH]).hex()}: "
                    f"declared length {length} sets the reserved first byte"
                )
                return size  # nothing after a bad header is read
            refused = ""
            if length <= self._max_length and self._admit is not None and not self._admitted:
                refused = self._admit(length) or ""
                self._admitted = 0 if refused else length
            if length > self._max_length or refused:
                events.append(OversizedFrame(stream_id, _frame_type(type_), length, refused))
                pos += HEADER_LENGTH
                self._discard = length
                continue
            start = pos + HEADER_LENGTH
            end = start + length
            if size < end:
                return pos
            # A slice of bytes is bytes already: one copy per payload, not two.
            payload = data[start:end] if isinstance(data, bytes) else bytes(data[start:end])
            events.append(Frame(stream_id, _frame_type(type_), flags, payload))
            self._admitted = 0
            pos = end
