"""ttrpc's RPC rules, sans-I/O: what each side may send, and the request/response envelopes.

`ServerProtocol.receive` and `ClientProtocol.receive` take decoded frames and return one event saying
what the adapter must do; a ProtocolError means the connection must be dropped. We serve unary calls
only: a streaming request is answered UNIMPLEMENTED, and data frames are ignored (see PROTOCOL.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from kybernate.api import ttrpc_pb2

from .errors import Code, ConnectionClosed, ProtocolError, TTRPCError
from .frames import MAX_MESSAGE_LENGTH, Event, Flags, Frame, FrameType, OversizedFrame

_MAX_STREAM_ID = 0xFFFF_FFFF
_STREAMING = int(Flags.REMOTE_OPEN | Flags.REMOTE_CLOSED)  # a plain int: `flags & enum` runs in Python

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Request:
    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0  # 0: no deadline
    metadata: Metadata = ()  # in wire order, repeats kept


@dataclass(frozen=True, slots=True)
class Response:
    status_code: Code = Code.OK
    status_message: str = ""
    status_details: tuple[bytes, ...] = ()  # serialized google.protobuf.Any messages, opaque
    payload: bytes = b""

    @property
    def ok(self) -> bool:
        return self.status_code == Code.OK

    @classmethod
    def from_error(cls, error: TTRPCError) -> Response:
        return cls(error.code, error.message, error.details)

    def error(self) -> TTRPCError | None:
        """The status as an exception, or None when it is OK."""
        if self.ok:
            return None
        return TTRPCError(self.status_code, self.status_message, self.status_details)


# --- envelopes ------------------------------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    message = ttrpc_pb2.Request(
        service=request.service,
        method=request.method,
        payload=request.payload,
        timeout_nano=request.timeout_nano,
        metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in request.metadata],
    )
    body: bytes = message.SerializeToString()
    return body


def decode_request(body: bytes) -> Request:
    """The request in a request frame's body; TTRPCError(INVALID_ARGUMENT) when it is not one."""
    message = ttrpc_pb2.Request()
    try:
        message.ParseFromString(body)
    except DecodeError as err:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"malformed request: {err}") from err
    return Request(
        service=message.service,
        method=message.method,
        payload=message.payload,
        timeout_nano=message.timeout_nano,
        metadata=tuple([(kv.key, kv.value) for kv in message.metadata]),
    )


def renamed_request(body: bytes, service: str) -> bytes:
    """An encoded request with its service replaced and all else as it came: a second service field is
    appended, and protobuf's rule for a field that occurs twice is that the last one read wins."""
    name = service.encode()
    return body + b"\x0a" + _varint(len(name)) + name


# An OK response as every ttrpc server writes it: an empty status (field 1), then the payload (field 2,
# left out when empty). This shape, by far the most common, is written and read without protobuf.
_OK_STATUS = b"\x0a\x00"
_PAYLOAD_TAG = 0x12


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _ok_payload(body: bytes) -> bytes | None:
    """The payload of a body shaped exactly as an OK response (status empty, then the payload), else None."""
    if body[:2] != _OK_STATUS:
        return None
    if len(body) == 2:
        return b""
    if body[2] != _PAYLOAD_TAG:
        return None
    length, shift, pos = 0, 0, 3
    while pos < len(body) and shift < 35:  # a length needs at most 5 bytes (it is below 2**32)
        byte = body[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return body[pos:] if pos + length == len(body) else None
        shift += 7
    return None


def encode_response(response: Response) -> bytes:
    if response.status_code == Code.OK and not response.status_message and not response.status_details:
        payload = response.payload
        return _OK_STATUS + bytes([_PAYLOAD_TAG]) + _varint(len(payload)) + payload if payload else _OK_STATUS
    status = ttrpc_pb2.Status(
        code=int(response.status_code), message=response.status_message, details=response.status_details
    )
    body: bytes = ttrpc_pb2.Response(status=status, payload=response.payload).SerializeToString()
    return body


def decode_response(body: bytes) -> Response:
    """The response in a response frame's body (no status means OK); ProtocolError when it is not one."""
    payload = _ok_payload(body)
    if payload is not None:
        return Response(payload=payload)
    message = ttrpc_pb2.Response()
    try:
        message.ParseFromString(body)
    except DecodeError as err:
        raise ProtocolError(f"malformed response: {err}") from err
    status = message.status
    return Response(
        status_code=Code.from_wire(status.code),
        status_message=status.message,
        status_details=tuple(status.details),
        payload=message.payload,
    )


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Server: run the handler for this request and answer on its stream."""

    stream_id: int
    request: Request
    body: bytes = field(default=b"", compare=False, repr=False)  # the request as it came, encoded


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """Server: answer this status on the stream without running a handler."""

    stream_id: int
    error: TTRPCError


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client: the answer to the call on this stream (if the caller still waits for it)."""

    stream_id: int
    response: Response


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """Client: the answer on this stream arrived but cannot be used; fail that call with `error`."""

    stream_id: int
    error: TTRPCError | ProtocolError


@dataclass(frozen=True, slots=True)
class Ignored:
    """A frame the protocol allows us to drop; the adapter may log the reason."""

    stream_id: int
    type: int
    reason: str


ServerEvent = RequestReceived | StreamRejected | Ignored
ClientEvent = ResponseReceived | StreamFailed | Ignored


def _too_large(event: OversizedFrame) -> TTRPCError:
    if event.refused:
        return TTRPCError(Code.RESOURCE_EXHAUSTED, f"message of {event.length} bytes refused: {event.refused}")
    return TTRPCError(
        Code.RESOURCE_EXHAUSTED,
        f"message length {event.length} exceeds the maximum message size of {MAX_MESSAGE_LENGTH}",
    )


# --- the two sides --------------------------------------------------------------------------------


class ServerProtocol:
    """The accepting side: client streams are odd and each request opens a higher id than the last."""

    def __init__(self) -> None:
        self.last_stream_id = 0

    def receive(self, event: Event) -> ServerEvent:
        type_ = event.type
        if type_ == FrameType.REQUEST:
            self._open_stream(event.stream_id)
            if isinstance(event, OversizedFrame):
                return StreamRejected(event.stream_id, _too_large(event))
            if event.flags & _STREAMING:
                return StreamRejected(
                    event.stream_id, TTRPCError(Code.UNIMPLEMENTED, "streaming calls are not supported")
                )
            try:
                return RequestReceived(event.stream_id, decode_request(event.payload), event.payload)
            except TTRPCError as err:
                return StreamRejected(event.stream_id, err)
        if type_ == FrameType.DATA:
            if event.stream_id % 2 == 0 or event.stream_id > self.last_stream_id:
                raise ProtocolError(f"data frame on stream {event.stream_id}, which the client never opened")
            return Ignored(event.stream_id, type_, "data frame: only unary calls are served")
        if type_ == FrameType.RESPONSE:
            raise ProtocolError(f"client sent a response frame on stream {event.stream_id}")
        return Ignored(event.stream_id, type_, f"unknown frame type {type_}")

    def _open_stream(self, stream_id: int) -> None:
        if stream_id % 2 == 0:
            raise ProtocolError(f"client opened stream {stream_id}: client stream ids must be odd")
        if stream_id <= self.last_stream_id:
            raise ProtocolError(
                f"client opened stream {stream_id} after {self.last_stream_id}: stream ids must increase"
            )
        self.last_stream_id = stream_id

    @staticmethod
    def response_frame(stream_id: int, response: Response) -> Frame:
        """The frame answering a stream; a response too large to send becomes RESOURCE_EXHAUSTED."""
        body = encode_response(response)
        if len(body) > MAX_MESSAGE_LENGTH:
            too_large = _too_large(OversizedFrame(stream_id, FrameType.RESPONSE, len(body)))
            body = encode_response(Response.from_error(too_large))
        return Frame(stream_id, FrameType.RESPONSE, 0, body)


class ClientProtocol:
    """The connecting side: allocates odd, increasing stream ids and checks the answers against them."""

    def __init__(self) -> None:
        self._next_stream_id = 1

    @property
    def last_stream_id(self) -> int:
        """The highest id opened so far (0 before the first request)."""
        return self._next_stream_id - 2

    def request_frame(self, request: Request) -> Frame:
        """The frame opening the next stream; TTRPCError(RESOURCE_EXHAUSTED), using no id, if over 4 MiB."""
        return self.encoded_request_frame(encode_request(request))

    def encoded_request_frame(self, body: bytes) -> Frame:
        """request_frame() for a request already encoded."""
        if len(body) > MAX_MESSAGE_LENGTH:
            raise _too_large(OversizedFrame(0, FrameType.REQUEST, len(body)))
        stream_id = self._next_stream_id
        if stream_id > _MAX_STREAM_ID:
            raise ConnectionClosed("all stream ids of this connection are used: open a new connection")
        self._next_stream_id += 2
        return Frame(stream_id, FrameType.REQUEST, 0, body)

    def receive(self, event: Event) -> ClientEvent:
        type_ = event.type
        if type_ == FrameType.RESPONSE:
            if event.stream_id % 2 == 0 or event.stream_id > self.last_stream_id:
                raise ProtocolError(f"response on stream {event.stream_id}, which we never opened")
            if isinstance(event, OversizedFrame):
                return StreamFailed(event.stream_id, _too_large(event))
            try:
                return ResponseReceived(event.stream_id, decode_response(event.payload))
            except ProtocolError as err:
                return StreamFailed(event.stream_id, err)
        if type_ == FrameType.REQUEST:
            raise ProtocolError(f"server opened stream {event.stream_id}: server-initiated streams are not supported")
        if type_ == FrameType.DATA:
            return Ignored(event.stream_id, type_, "data frame: we make unary calls only")
        return Ignored(event.stream_id, type_, f"unknown frame type {type_}")
