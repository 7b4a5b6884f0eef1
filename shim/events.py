"""The runc child's events, through our shim to containerd: forwarded as they came, in order, or dropped.

containerd gives every shim the address of its ttrpc events service in `TTRPC_ADDRESS`; the runc shim
publishes each task event there (`containerd.services.events.ttrpc.v1.Events/Forward`, one Envelope per
call, one call at a time, retried by the child when the call fails). Our `start` gives the child our own
socket as `TTRPC_ADDRESS` instead (shim/manager.py), so every event passes here first. That lets a hibernated
task keep its identity: the child's TaskExit of the dump, its TaskDelete, and the TaskCreate/TaskStart of
the restore are dropped for that container (shim/hibernate.py), and containerd sees nothing but RUNNING.

The hop is kept cheap: the request's bytes go on to containerd untouched; they are parsed only while some
task of this shim is hibernating, and then only the topic and the event's first field (its container id).
Forwarding is serialised (one call to containerd at a time: the order is containerd's order) and each call
is bounded by FORWARD_TIMEOUT_S; a failure is answered to the child as the failure it is, and the child
retries as it would against containerd.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .ttrpc.client import Client
from .ttrpc.errors import Code, ConnectionClosed, TTRPCError
from .ttrpc.server import Call

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_TIMEOUT_S = 5.0  # what the runc shim itself allows one Forward

# The topics of a task's own lifecycle; a hibernating task's are dropped.
TASK_EXIT = "/tasks/exit"
TASK_DELETE = "/tasks/delete"
TASK_CREATE = "/tasks/create"
TASK_START = "/tasks/start"

# Decides for (topic, container id) whether the event is dropped; consulted only while it says it may drop.
DropRule = Callable[[str, str], bool]


class EventsProxy:
    """Serves the child's Forward calls and publishes our own events to containerd's ttrpc address."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: Client | None = None
        self._lock = asyncio.Lock()  # one Forward at a time, in the order they came
        self.drop_rule: DropRule | None = None  # set while a task of this shim is (de)hibernating
        self.forwarded = 0
        self.dropped = 0

    async def handle(self, call: Call) -> bytes:
        if call.method != "Forward":
            raise TTRPCError(Code.UNIMPLEMENTED, f"{EVENTS_SERVICE}/{call.method} is not served by the kybernate shim")
        rule = self.drop_rule
        if rule is not None:
            topic, container_id = envelope_topic_and_id(call.payload)
            if rule(topic, container_id):
                self.dropped += 1
                log.info("event dropped: the task is hibernated",
                         extra={"fields": {"topic": topic, "id": container_id}})
                return b""  # an empty ForwardResponse-free answer: google.protobuf.Empty
        return await self.forward(call.payload, call.metadata)

    async def publish(self, namespace: str, topic: str, type_url: str, event: bytes) -> None:
        """Our own event (a hibernated task's exit or delete), through the same ordered path."""
        from google.protobuf import any_pb2, timestamp_pb2

        from kybernate.api import hibernate_pb2

        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(time.time_ns())
        request = hibernate_pb2.ForwardRequest(envelope=hibernate_pb2.Envelope(
            timestamp=stamp, namespace=namespace, topic=topic, event=any_pb2.Any(type_url=type_url, value=event)))
        await self.forward(request.SerializeToString(), (("containerd-namespace-ttrpc", namespace),))

    async def forward(self, payload: bytes, metadata: tuple[tuple[str, str], ...]) -> bytes:
        if not self.address:
            raise TTRPCError(Code.UNAVAILABLE, "containerd gave this shim no TTRPC_ADDRESS: events cannot be forwarded")
        async with self._lock:
            for attempt in (1, 2):  # a connection containerd closed (its restart) is dialled again once
                try:
                    client = await self._connect()
                    reply = await client.call(EVENTS_SERVICE, "Forward", payload, metadata=metadata,
                                              timeout=FORWARD_TIMEOUT_S)
                    self.forwarded += 1
                    return reply
                except (ConnectionClosed, OSError) as err:
                    await self._drop_client()
                    if attempt == 2:
                        raise TTRPCError(Code.UNAVAILABLE, f"cannot forward the event to containerd at "
                                                           f"{self.address}: {err}") from err
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._drop_client()

    async def _connect(self) -> Client:
        if self._client is None or self._client.closed:
            self._client = await Client.connect(self.address)
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def envelope_topic_and_id(payload: bytes) -> tuple[str, str]:
    """(topic, container id) of a ForwardRequest, reading only those two fields; ('', '') if malformed.

    Every task event of containerd's has the container id as its field 1 (TaskCreate, TaskStart, TaskExit,
    TaskDelete, TaskOOM, TaskPaused, ...)."""
    try:
        envelope = _field(payload, 1)
        if envelope is None:
            return "", ""
        topic = _field(envelope, 3)
        event = _field(envelope, 4)
        value = _field(event, 2) if event is not None else None
        container = _field(value, 1) if value is not None else None
        return (topic or b"").decode(errors="replace"), (container or b"").decode(errors="replace")
    except (IndexError, ValueError):
        return "", ""


def first_string_field(payload: bytes) -> str:
    """Field 1 of a message as a string: the task id of every task API request."""
    try:
        found = _field(payload, 1)
    except (IndexError, ValueError):
        return ""
    return found.decode(errors="replace") if found is not None else ""


def field_bytes(data: bytes, number: int) -> bytes | None:
    """The first length-delimited field `number` of a protobuf message (ValueError/IndexError if malformed)."""
    return _field(data, number)


def varint_field(data: bytes, number: int) -> int | None:
    """The first varint field `number` of a protobuf message (ValueError/IndexError if malformed)."""
    i, end = 0, len(data)
    while i < end:
        key, i = _varint(data, i)
        found, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            if found == number:
                return value
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _varint(data, i)
            i += size
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return None


def _field(data: bytes, number: int) -> bytes | None:
    """The first length-delimited field `number` of a protobuf message, skipping the others."""
    i, end = 0, len(data)
    while i < end:
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _varint(data, i)
            if i + size > end:
                raise ValueError("truncated field")
            if field == number:
                return data[i:i + size]
            i += size
        else:
            raise ValueError(f"unsupported wire type {wire}")
    return None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
