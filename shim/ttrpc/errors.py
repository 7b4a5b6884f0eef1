"""The error types of the ttrpc layer: statuses, protocol violations, lost connections."""

from __future__ import annotations

from collections.abc import Iterable

from .codes import Code

__all__ = ["Code", "ConnectionClosed", "FrameTooLarge", "ProtocolError", "TTRPCError"]


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
