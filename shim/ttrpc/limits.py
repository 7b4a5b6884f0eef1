"""How much a ttrpc server lets its peers make it hold: connections, requests in flight, buffered bytes.

Without these, 300 connections each holding a 4 MiB frame minus one byte grew a shim to 1.76 GB.
Body bytes are counted from the moment a frame's header declares them (the frame is admitted or
skipped before its body arrives) until the frame is handed on; a request's payload is counted again
while its handler runs (or its call is passed through). Not counted, and bounded per connection on their
own: a frame header (10 bytes), one read (READ_CHUNK, 256 KiB, parsed as it arrives) and the answers
waiting to be written (asyncio's high-water mark, 64 KiB, plus one frame: connection.py). Sans-I/O: the
server and its connections call in, nothing here awaits.
"""

from __future__ import annotations

from dataclasses import dataclass

from .frames import MAX_MESSAGE_LENGTH


@dataclass(frozen=True, slots=True)
class Limits:
    # Connections open at once; one more is closed as soon as it is accepted (logged). containerd
    # keeps one or two per shim; 32 leaves room for tools and reconnects.
    max_connections: int = 32
    # Requests whose handler runs at once on one connection; one more is answered RESOURCE_EXHAUSTED.
    # containerd keeps one Wait per process (containers and execs of the pod) plus short calls.
    max_requests_per_connection: int = 256
    # Bytes of admitted frames and running requests' payloads one connection may hold: one frame of
    # the largest size. More (a frame while a large request runs) is refused with RESOURCE_EXHAUSTED.
    max_buffered_per_connection: int = MAX_MESSAGE_LENGTH
    # The same, summed over every connection of the server, for frames larger than small_frame: four
    # largest frames at once.
    max_buffered_total: int = 16 << 20
    # Frames up to this size (containerd's calls are a few KB) draw on a pool of their own, so peers
    # holding the large pool cannot starve them.
    small_frame: int = 64 << 10
    # The small frames' pool, summed over every connection.
    max_buffered_small: int = 2 << 20

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_requests_per_connection) < 1:
            raise ValueError("max_connections and max_requests_per_connection must be at least 1")
        if not 0 < self.max_buffered_per_connection <= self.max_buffered_total:
            raise ValueError("want 0 < max_buffered_per_connection <= max_buffered_total")
        if not 0 <= self.small_frame <= self.max_buffered_small:
            raise ValueError("want 0 <= small_frame <= max_buffered_small")


class BufferBudget:
    """The server-wide count of buffered bytes, and the caps a new reservation must fit under."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.used = 0  # bytes of large frames reserved by every connection together
        self.used_small = 0  # the same for frames up to limits.small_frame
        self.peak = 0  # the most ever reserved at once, both pools (for tests)

    def take(self, size: int, held_by_connection: int) -> str | None:
        """Reserve `size` bytes for a connection already holding `held_by_connection`; None when
        reserved, else why not (a sentence for the log and for the peer's RESOURCE_EXHAUSTED)."""
        limits = self.limits
        if held_by_connection + size > limits.max_buffered_per_connection:
            return (f"{size} bytes would put this connection over its buffer cap of "
                    f"{limits.max_buffered_per_connection} bytes ({held_by_connection} held)")
        if size <= limits.small_frame:
            if self.used_small + size > limits.max_buffered_small:
                return (f"{size} bytes would put the server over its buffer cap of {limits.max_buffered_small} "
                        f"bytes for small messages ({self.used_small} held by all connections)")
            self.used_small += size
        elif self.used + size > limits.max_buffered_total:
            return (f"{size} bytes would put the server over its total buffer cap of "
                    f"{limits.max_buffered_total} bytes ({self.used} held by all connections)")
        else:
            self.used += size
        self.peak = max(self.peak, self.used + self.used_small)
        return None

    def give(self, size: int) -> None:
        if size <= self.limits.small_frame:
            self.used_small -= size
        else:
            self.used -= size
        assert min(self.used, self.used_small) >= 0, "buffer budget released more than it reserved"
