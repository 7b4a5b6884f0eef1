"""Property tests of the frame decoder: arbitrary bytes, arbitrary chopping."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kybernate.shim.ttrpc.errors import ProtocolError
from kybernate.shim.ttrpc.frames import Frame, FrameDecoder, OversizedFrame, encode_frame
from kybernate.shim.ttrpc.protocol import ServerProtocol

MAX = 64  # a small limit so oversized frames are cheap to generate

FAST = settings(max_examples=300, deadline=None)


def chop(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def run_decoder(chunks: list[bytes]) -> tuple[list[object], ProtocolError | None]:
    decoder = FrameDecoder(max_length=MAX)
    events: list[object] = []
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            events.extend(decoder)
    except ProtocolError as err:
        return events, err
    return events, None


@FAST
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=20))
def test_random_bytes_raise_nothing_but_protocol_errors_and_chopping_does_not_matter(data, cuts):
    whole, whole_error = run_decoder([data])
    chopped, chopped_error = run_decoder(chop(data, cuts))
    assert chopped == whole
    assert (whole_error is None) == (chopped_error is None)


@FAST
@given(st.binary(max_size=600))
def test_random_bytes_through_the_server_rules_raise_only_protocol_errors(data):
    decoder, server = FrameDecoder(max_length=MAX), ServerProtocol()
    decoder.feed(data)
    try:
        for event in decoder:
            server.receive(event)
    except ProtocolError:
        pass


frames = st.builds(
    Frame,
    stream_id=st.integers(min_value=0, max_value=2**32 - 1),
    type=st.integers(min_value=0, max_value=255),
    flags=st.integers(min_value=0, max_value=255),
    payload=st.binary(max_size=MAX + 40),
)


def expected(frame: Frame) -> object:
    if len(frame.payload) > MAX:
        return OversizedFrame(frame.stream_id, frame.type, len(frame.payload))
    return frame


@FAST
@given(st.lists(frames, max_size=12), st.lists(st.integers(min_value=0), max_size=30))
def test_valid_frames_chopped_anywhere_come_out_exactly(sequence, cuts):
    wire = b"".join(encode_frame(f) for f in sequence)
    events, error = run_decoder(chop(wire, cuts))
    assert error is None
    assert events == [expected(f) for f in sequence]


@FAST
@given(
    st.lists(frames, min_size=1, max_size=6), st.binary(min_size=1, max_size=40), st.lists(st.integers(0), max_size=10)
)
def test_frames_before_garbage_are_delivered_then_the_error(sequence, garbage, cuts):
    garbage = b"\x01" + garbage  # a header whose reserved first byte is set
    wire = b"".join(encode_frame(f) for f in sequence) + garbage.ljust(10, b"\x00")
    events, error = run_decoder(chop(wire, cuts))
    assert events == [expected(f) for f in sequence]
    assert isinstance(error, ProtocolError)
