"""Protocol rules and envelopes without sockets."""

import pytest

from kybernate.api import ttrpc_pb2
from kybernate.shim.ttrpc.errors import Code, ProtocolError, TTRPCError
from kybernate.shim.ttrpc.frames import (
    MAX_MESSAGE_LENGTH,
    Flags,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    encode_frame,
)
from kybernate.shim.ttrpc.protocol import (
    ClientProtocol,
    Ignored,
    Request,
    RequestReceived,
    Response,
    ResponseReceived,
    ServerProtocol,
    StreamFailed,
    StreamRejected,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    renamed_request,
)

REQ = Request("svc", "Method", b"payload", 5, (("k", "v"),))


def request_frame(stream_id: int, flags: int = 0, body: bytes | None = None) -> Frame:
    return Frame(stream_id, FrameType.REQUEST, flags, encode_request(REQ) if body is None else body)


# --- errors ----------------------------------------------------------------------------------------


def test_codes_are_the_17_grpc_codes():
    assert len(Code) == 17
    assert (Code.OK, Code.UNIMPLEMENTED, Code.UNAUTHENTICATED) == (0, 12, 16)
    assert Code.from_wire(99) is Code.UNKNOWN


def test_ttrpc_error_text_and_fields():
    err = TTRPCError(Code.NOT_FOUND, "no such task", [b"d1"])
    assert str(err) == "ttrpc status NOT_FOUND: no such task"
    assert (err.code, err.message, err.details) == (Code.NOT_FOUND, "no such task", (b"d1",))


# --- envelopes -------------------------------------------------------------------------------------


def test_request_round_trip_keeps_metadata_order_and_repeats():
    request = Request("containerd.task.v2.Task", "Wait", b"\x00\x01", 10**9,
                      (("containerd-namespace-ttrpc", "k8s.io"), ("x", "1"), ("x", "2"), ("ünï", "cödé")))
    assert decode_request(encode_request(request)) == request


def test_request_bytes_match_the_protobuf_message():
    parsed = ttrpc_pb2.Request.FromString(encode_request(REQ))
    assert (parsed.service, parsed.method, parsed.payload, parsed.timeout_nano) == ("svc", "Method", b"payload", 5)
    assert [(kv.key, kv.value) for kv in parsed.metadata] == [("k", "v")]


def test_a_renamed_request_reads_as_the_same_request_for_the_other_service():
    body = encode_request(REQ)
    renamed = renamed_request(body, "containerd.task.v3.Task")
    assert renamed.startswith(body)  # the rest as it came
    assert decode_request(renamed) == Request("containerd.task.v3.Task", REQ.method, REQ.payload, REQ.timeout_nano,
                                              REQ.metadata)
    assert ttrpc_pb2.Request.FromString(renamed).service == "containerd.task.v3.Task"


@pytest.mark.parametrize("body", [b"\xff", b"\x0a\x05ab", b"\x0a\x01\xff", b"GARBAGE"])
def test_malformed_request_is_invalid_argument(body):
    with pytest.raises(TTRPCError) as info:
        decode_request(body)
    assert info.value.code == Code.INVALID_ARGUMENT


def test_response_round_trip_keeps_status_untouched():
    response = Response(Code.FAILED_PRECONDITION, "task is paused", (b"\x0a\x03abc", b""), b"p")
    assert decode_response(encode_response(response)) == response


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16_383, 16_384, 2_097_152, 4 << 20])
def test_ok_responses_are_written_exactly_as_protobuf_writes_them_and_read_back(size):
    payload = bytes(i % 251 for i in range(size))
    expected = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=0), payload=payload).SerializeToString()
    assert encode_response(Response(payload=payload)) == expected
    assert decode_response(expected) == Response(payload=payload)


@pytest.mark.parametrize("body", [
    b"\x0a\x00\x12\x02ab\x1a\x00",  # a field after the payload
    b"\x0a\x00\x0a\x02\x08\x05",  # a second status, not empty: the last one counts
    b"\x12\x02ab\x0a\x00",  # payload first
    b"\x0a\x00\x12\x82\x01ab",  # a length beyond the body
])
def test_responses_of_any_other_shape_read_as_protobuf_reads_them(body):
    try:
        message = ttrpc_pb2.Response.FromString(body)
    except Exception:
        with pytest.raises(ProtocolError):
            decode_response(body)
        return
    response = decode_response(body)
    assert (response.status_code, response.payload) == (message.status.code, message.payload)


def test_response_without_status_is_ok_and_unknown_codes_read_as_unknown():
    assert decode_response(b"") == Response()
    body = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=42, message="m")).SerializeToString()
    assert decode_response(body).status_code is Code.UNKNOWN


def test_malformed_response_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode_response(b"\xff\xff")


def test_response_error_helpers():
    assert Response(payload=b"x").error() is None
    err = Response(Code.NOT_FOUND, "gone", (b"d",)).error()
    assert err is not None and (err.code, err.message, err.details) == (Code.NOT_FOUND, "gone", (b"d",))
    assert Response.from_error(TTRPCError(Code.ABORTED, "a")) == Response(Code.ABORTED, "a")


# --- server rules ----------------------------------------------------------------------------------


def test_server_accepts_odd_increasing_ids_with_gaps():
    server = ServerProtocol()
    for stream_id in (1, 3, 9, 11):
        assert server.receive(request_frame(stream_id)) == RequestReceived(stream_id, REQ)
    assert server.last_stream_id == 11


@pytest.mark.parametrize("ids", [(2,), (1, 1), (5, 3), (1, 4)])
def test_server_rejects_even_or_non_increasing_ids(ids):
    server = ServerProtocol()
    *good, bad = ids
    for stream_id in good:
        server.receive(request_frame(stream_id))
    with pytest.raises(ProtocolError):
        server.receive(request_frame(bad))


def test_malformed_request_rejects_only_its_stream_and_uses_its_id():
    server = ServerProtocol()
    event = server.receive(request_frame(1, body=b"\xff"))
    assert isinstance(event, StreamRejected) and event.stream_id == 1
    assert event.error.code == Code.INVALID_ARGUMENT
    assert server.receive(request_frame(3)) == RequestReceived(3, REQ)
    with pytest.raises(ProtocolError):
        server.receive(request_frame(1))


def test_oversized_request_is_resource_exhausted_and_follows_id_rules():
    server = ServerProtocol()
    event = server.receive(OversizedFrame(1, FrameType.REQUEST, MAX_MESSAGE_LENGTH + 1))
    assert isinstance(event, StreamRejected) and event.error.code == Code.RESOURCE_EXHAUSTED
    assert "4194305" in event.error.message
    with pytest.raises(ProtocolError):
        server.receive(OversizedFrame(1, FrameType.REQUEST, MAX_MESSAGE_LENGTH + 1))
    with pytest.raises(ProtocolError):
        server.receive(OversizedFrame(4, FrameType.REQUEST, MAX_MESSAGE_LENGTH + 1))


@pytest.mark.parametrize("flags", [Flags.REMOTE_OPEN, Flags.REMOTE_CLOSED])
def test_streaming_requests_are_unimplemented(flags):
    event = ServerProtocol().receive(request_frame(1, flags))
    assert isinstance(event, StreamRejected) and event.error.code == Code.UNIMPLEMENTED


def test_data_frames_are_ignored_on_opened_streams_and_a_violation_elsewhere():
    server = ServerProtocol()
    server.receive(request_frame(3))
    assert isinstance(server.receive(Frame(3, FrameType.DATA, Flags.REMOTE_CLOSED, b"x")), Ignored)
    assert isinstance(server.receive(Frame(1, FrameType.DATA, 0, b"x")), Ignored)
    assert isinstance(server.receive(OversizedFrame(3, FrameType.DATA, MAX_MESSAGE_LENGTH + 1)), Ignored)
    with pytest.raises(ProtocolError):
        server.receive(Frame(5, FrameType.DATA, 0, b"x"))
    with pytest.raises(ProtocolError):
        server.receive(Frame(2, FrameType.DATA, 0, b"x"))


def test_server_refuses_responses_from_a_client_and_ignores_unknown_types():
    server = ServerProtocol()
    assert isinstance(server.receive(Frame(1, 7, 0, b"future")), Ignored)
    assert server.receive(request_frame(1)) == RequestReceived(1, REQ)  # an unknown type opened nothing
    with pytest.raises(ProtocolError):
        server.receive(Frame(1, FrameType.RESPONSE, 0, b""))


def test_response_frame_and_its_size_limit():
    frame = ServerProtocol.response_frame(7, Response(payload=b"ok"))
    assert (frame.stream_id, frame.type, frame.flags) == (7, FrameType.RESPONSE, 0)
    assert decode_response(frame.payload) == Response(payload=b"ok")
    big = ServerProtocol.response_frame(7, Response(payload=bytes(MAX_MESSAGE_LENGTH)))
    assert decode_response(big.payload).status_code == Code.RESOURCE_EXHAUSTED


# --- client rules ----------------------------------------------------------------------------------


def test_client_ids_are_odd_and_increasing():
    client = ClientProtocol()
    assert [client.request_frame(REQ).stream_id for _ in range(4)] == [1, 3, 5, 7]
    assert client.last_stream_id == 7


def test_client_refuses_too_large_requests_without_using_an_id():
    client = ClientProtocol()
    with pytest.raises(TTRPCError) as info:
        client.request_frame(Request("s", "m", bytes(MAX_MESSAGE_LENGTH)))
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert client.request_frame(REQ).stream_id == 1


def test_client_frames_decode_on_a_server():
    client, server, decoder = ClientProtocol(), ServerProtocol(), FrameDecoder()
    decoder.feed(encode_frame(client.request_frame(REQ)) + encode_frame(client.request_frame(REQ)))
    assert [server.receive(f) for f in decoder] == [RequestReceived(1, REQ), RequestReceived(3, REQ)]


def test_client_receives_responses_for_streams_it_opened():
    client = ClientProtocol()
    client.request_frame(REQ)
    client.request_frame(REQ)
    response = Response(Code.NOT_FOUND, "nope")
    assert client.receive(ServerProtocol.response_frame(3, response)) == ResponseReceived(3, response)
    for stream_id in (5, 2):
        with pytest.raises(ProtocolError):
            client.receive(ServerProtocol.response_frame(stream_id, response))


def test_client_fails_one_stream_for_bad_or_oversized_responses():
    client = ClientProtocol()
    client.request_frame(REQ)
    bad = client.receive(Frame(1, FrameType.RESPONSE, 0, b"\xff\xff"))
    assert isinstance(bad, StreamFailed) and isinstance(bad.error, ProtocolError)
    big = client.receive(OversizedFrame(1, FrameType.RESPONSE, MAX_MESSAGE_LENGTH + 1))
    assert isinstance(big, StreamFailed) and isinstance(big.error, TTRPCError)
    assert big.error.code == Code.RESOURCE_EXHAUSTED


def test_client_ignores_data_and_unknown_types_and_refuses_server_requests():
    client = ClientProtocol()
    client.request_frame(REQ)
    assert isinstance(client.receive(Frame(1, FrameType.DATA, 0, b"")), Ignored)
    assert isinstance(client.receive(Frame(1, 200, 0, b"")), Ignored)
    with pytest.raises(ProtocolError):
        client.receive(Frame(2, FrameType.REQUEST, 0, encode_request(REQ)))
