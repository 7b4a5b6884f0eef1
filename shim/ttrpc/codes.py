"""The one status-code enum of Kybernate: ttrpc, the shim, the hookd client and the hookd service share it.

A leaf module (standard library only, no package imports) so hookd and its client can use it without
loading the ttrpc stack or protobuf.
"""

from __future__ import annotations

import enum


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
