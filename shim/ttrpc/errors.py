"""The error types of the ttrpc layer: statuses, protocol violations, lost connections."""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Code(enum.IntEnum):
    """The gRPC status codes, which ttrpc carries unchanged in google.rpc.Status.code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> Code:
        """The code for a number read off the wire; numbers gRPC does not define read as UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TTRPCError(Exception):
    """A non-OK status: received from the peer, or raised by a handler to be sent to the peer."""

    def __init__(self, code: Code, message: str = "", details: Iterable[bytes] = ()) -> None:
        self.code = Code(code)
        self.message = message
        # Each detail is a serialized google.protobuf.Any, kept opaque so it passes through untouched.
        self.details: tuple[bytes, ...] = tuple(details)
        super().__init__(code, message)

    def __str__(self) -> str:
        return f"ttrpc status {self.code.name}: {self.message}"

    def __repr__(self) -> str:
        return f"TTRPCError({self.code.name}, {self.message!r})"


class ProtocolError(Exception):
    """The peer broke the framing or the protocol's rules; the connection cannot be trusted further."""


class ConnectionClosed(Exception):
    """The connection ended (EOF, reset or local close) before the answer arrived."""


class FrameTooLarge(ValueError):
    """A frame we were asked to send exceeds the 4 MiB limit; nothing was written."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(f"ttrpc message of {length} bytes exceeds the limit of {limit} bytes")
