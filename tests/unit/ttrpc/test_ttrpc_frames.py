"""Framing without sockets: header layout, split feeds, limits, oversized frames, garbage."""

import pytest

from kybernate.shim.ttrpc.errors import FrameTooLarge, ProtocolError
from kybernate.shim.ttrpc.frames import (
    HEADER_LENGTH,
    MAX_MESSAGE_LENGTH,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    encode_frame,
)


def decode_all(decoder: FrameDecoder, *chunks: bytes) -> list[object]:
    out: list[object] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out.extend(decoder)
    return out


def test_header_is_ten_bytes_big_endian():
    data = encode_frame(Frame(0x01020304, FrameType.RESPONSE, 0x05, b"abc"))
    assert HEADER_LENGTH == 10
    assert data == bytes.fromhex("00000003" "01020304" "02" "05") + b"abc"


def test_empty_body_and_request_layout():
    assert encode_frame(Frame(1, FrameType.REQUEST)) == bytes.fromhex("00000000000000010100")


def test_encode_refuses_bodies_over_4_mib_and_accepts_exactly_4_mib():
    assert MAX_MESSAGE_LENGTH == 4 << 20
    assert len(encode_frame(Frame(1, 1, 0, bytes(MAX_MESSAGE_LENGTH)))) == MAX_MESSAGE_LENGTH + 10
    with pytest.raises(FrameTooLarge, match="4194305 bytes exceeds the limit of 4194304"):
        encode_frame(Frame(1, 1, 0, bytes(MAX_MESSAGE_LENGTH + 1)))


@pytest.mark.parametrize("frame", [Frame(-1, 1), Frame(1 << 32, 1), Frame(1, 256), Frame(1, 1, 256)])
def test_encode_refuses_header_fields_out_of_range(frame):
    with pytest.raises(ValueError):
        encode_frame(frame)


FRAMES = [
    Frame(1, FrameType.REQUEST, 0, b"first"),
    Frame(3, FrameType.REQUEST, 0, b""),
    Frame(5, FrameType.DATA, 0x1, bytes(range(256)) * 3),
    Frame(7, 9, 0xFF, b"unknown type passes through"),
]
WIRE = b"".join(encode_frame(f) for f in FRAMES)


def test_multiple_frames_in_one_feed():
    assert decode_all(FrameDecoder(), WIRE) == FRAMES


def test_every_split_point_gives_the_same_frames():
    for cut in range(len(WIRE) + 1):
        decoder = FrameDecoder()
        assert decode_all(decoder, WIRE[:cut], WIRE[cut:]) == FRAMES, cut
        assert decoder.buffered == 0


def test_bytes_bytearray_and_memoryview_reads_give_the_same_frames_with_bytes_payloads():
    # A read of bytes is parsed in place; other buffers, and a frame's rest after an earlier read, are copied.
    for kind in (bytes, bytearray, memoryview):
        for cut in (0, 3, 10, 25, len(WIRE) - 1):
            frames = decode_all(FrameDecoder(), kind(WIRE[:cut]), kind(WIRE[cut:]))
            assert frames == FRAMES, (kind, cut)
            assert all(type(f.payload) is bytes for f in frames), (kind, cut)


def test_a_read_ending_in_a_partial_frame_keeps_only_that_part():
    decoder = FrameDecoder()
    assert decode_all(decoder, WIRE + WIRE[:13]) == FRAMES
    assert decoder.buffered == 13
    assert decode_all(decoder, WIRE[13:]) == FRAMES and decoder.buffered == 0


def test_byte_by_byte():
    decoder = FrameDecoder()
    assert decode_all(decoder, *(WIRE[i:i + 1] for i in range(len(WIRE)))) == FRAMES


def test_incomplete_frame_is_held_until_complete():
    decoder = FrameDecoder()
    wire = encode_frame(Frame(1, 1, 0, b"hello"))
    decoder.feed(wire[:-1])
    assert decoder.next_frame() is None
    assert decoder.buffered == len(wire) - 1
    decoder.feed(wire[-1:])
    assert decoder.next_frame() == Frame(1, 1, 0, b"hello")
    assert decoder.next_frame() is None


def test_known_types_decode_as_frame_type_and_unknown_as_numbers():
    frames = decode_all(FrameDecoder(), WIRE)
    assert [type(f.type) for f in frames] == [FrameType, FrameType, FrameType, int]


def test_a_body_of_exactly_the_limit_is_a_frame():
    body = b"x" * MAX_MESSAGE_LENGTH
    assert decode_all(FrameDecoder(), encode_frame(Frame(1, 1, 0, body))) == [Frame(1, 1, 0, body)]


def header(length: int, stream_id: int, type_: int = 1, flags: int = 0) -> bytes:
    return length.to_bytes(4, "big") + stream_id.to_bytes(4, "big") + bytes([type_, flags])


def test_oversized_frame_is_reported_then_skipped_without_buffering():
    decoder = FrameDecoder()
    length = MAX_MESSAGE_LENGTH + 1
    decoder.feed(header(length, 1))
    assert decoder.next_frame() == OversizedFrame(1, FrameType.REQUEST, length)
    fed = 0
    chunk = b"\xff" * 65536
    while fed + len(chunk) < length:
        decoder.feed(chunk)
        fed += len(chunk)
        assert decoder.buffered == 0
        assert decoder.discarding == length - fed
        assert decoder.next_frame() is None
    # The rest of the body and the next frame in one feed: the connection goes on.
    decoder.feed(b"\xff" * (length - fed) + encode_frame(Frame(3, 1, 0, b"next")))
    assert list(decoder) == [Frame(3, 1, 0, b"next")]
    assert decoder.discarding == 0


def test_oversized_frame_in_the_middle_of_one_feed():
    decoder = FrameDecoder(max_length=8)
    wire = encode_frame(Frame(1, 1, 0, b"ok")) + header(9, 3) + b"123456789" + encode_frame(Frame(5, 1, 0, b"12345678"))
    for cut in range(len(wire) + 1):
        decoder = FrameDecoder(max_length=8)
        assert decode_all(decoder, wire[:cut], wire[cut:]) == [
            Frame(1, 1, 0, b"ok"),
            OversizedFrame(3, FrameType.REQUEST, 9),
            Frame(5, 1, 0, b"12345678"),
        ], cut


def test_garbage_is_a_protocol_error_after_the_frames_before_it():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Frame(1, 1, 0, b"ok")) + b"GARBAGE GARBAGE")
    assert decoder.next_frame() == Frame(1, 1, 0, b"ok")
    with pytest.raises(ProtocolError, match="reserved first byte"):
        decoder.next_frame()
    # Dead from then on, whatever arrives.
    decoder.feed(encode_frame(Frame(3, 1, 0, b"late")))
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    assert decoder.buffered == 0


def test_lengths_between_the_limit_and_16_mib_are_oversized_not_garbage():
    decoder = FrameDecoder()
    decoder.feed(header(0x00FF_FFFF, 1))
    assert decoder.next_frame() == OversizedFrame(1, 1, 0x00FF_FFFF)
    decoder = FrameDecoder()
    decoder.feed(header(0x0100_0000, 1))
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_max_length_is_bounded_by_the_protocol_limit():
    with pytest.raises(ValueError):
        FrameDecoder(max_length=MAX_MESSAGE_LENGTH + 1)
