"""The CryptoVM frame codec (sans-IO): round trips, every malformed input, and
hypothesis fuzzing - arbitrary bytes must only ever produce ProtocolError."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cryptovm.errors import AccessDenied, KeyUsageError, NotFound, ProtocolError, ReleaseDenied
from cryptovm.wire import (
    MAGIC,
    MAX_BODY,
    OPS,
    FrameDecoder,
    decode_request,
    decode_response,
    describe_error,
    encode_error,
    encode_request,
    encode_result,
    error_from_wire,
    frame,
)


def _one(data: bytes) -> bytes:
    bodies, error = FrameDecoder().feed(data)
    assert error is None and len(bodies) == 1
    return bodies[0]


def test_request_round_trip_keeps_bytes_as_bytes() -> None:
    data = encode_request(7, "sign", "alice", {"key_id": "k1", "data": b"\x00\xffhello"})
    request = decode_request(_one(data))
    assert (request.id, request.op, request.account) == (7, "sign", "alice")
    assert request.args == {"key_id": "k1", "data": b"\x00\xffhello"}


def test_response_round_trip_and_errors() -> None:
    ok = decode_response(_one(encode_result(3, {"signature": b"sig", "valid": True})))
    assert ok.ok and ok.id == 3 and ok.result == {"signature": b"sig", "valid": True}
    err = decode_response(_one(encode_error(4, "usage", "sign-only key", "usage")))
    assert not err.ok
    exc = error_from_wire(err.error)
    assert isinstance(exc, KeyUsageError) and exc.check == "usage"


@pytest.mark.parametrize("exc", [AccessDenied("privilege", "lacks key:k:sign"),
                                 ReleaseDenied("nonce", "reused"), NotFound("no key 'x'")])
def test_errors_cross_the_wire_as_the_same_exception(exc: Exception) -> None:
    code, message, check = describe_error(exc)
    back = error_from_wire({"code": code, "message": message, "check": check})
    assert type(back) is type(exc) and str(back) == str(exc)


def test_internal_errors_do_not_leak_details() -> None:
    code, message, _ = describe_error(RuntimeError("secret path /x/y"))
    assert code == "internal" and "/x/y" not in message


def test_decoder_reassembles_frames_fed_byte_by_byte() -> None:
    stream = b"".join(encode_request(i, "ping", None, {}) for i in range(3))
    decoder, bodies = FrameDecoder(), []
    for i in range(len(stream)):
        got, error = decoder.feed(stream[i:i + 1])
        assert error is None
        bodies += got
    assert [decode_request(b).id for b in bodies] == [0, 1, 2]
    assert decoder.buffered == 0


def test_bad_magic_is_fatal_but_earlier_frames_survive() -> None:
    good = encode_request(1, "ping", None, {})
    bodies, error = FrameDecoder().feed(good + b"HTTP/1.1 GET /\r\n")
    assert len(bodies) == 1
    assert error is not None and error.fatal and error.code == "malformed_frame"


def test_bad_magic_detected_from_the_first_bytes() -> None:
    _, error = FrameDecoder().feed(b"GE")
    assert error is not None and error.fatal


def test_oversized_length_is_refused_before_reading_the_body() -> None:
    _, error = FrameDecoder().feed(MAGIC + (MAX_BODY + 1).to_bytes(4, "big"))
    assert error is not None and error.fatal and error.code == "frame_too_large"
    with pytest.raises(ProtocolError, match="exceeds"):
        frame(b"x" * (MAX_BODY + 1))


def test_truncated_frame_waits_for_more() -> None:
    decoder = FrameDecoder()
    data = encode_request(1, "ping", None, {})
    bodies, error = decoder.feed(data[:-3])
    assert bodies == [] and error is None and decoder.buffered == len(data) - 3


@pytest.mark.parametrize("body,code", [
    (b"not json", "malformed_request"),
    (b"\xff\xfe", "malformed_request"),
    (b"[1,2]", "malformed_request"),
    (b'{"v":2,"id":1,"op":"ping"}', "malformed_request"),
    (b'{"v":1,"id":-1,"op":"ping"}', "malformed_request"),
    (b'{"v":1,"id":true,"op":"ping"}', "malformed_request"),
    (b'{"v":1,"id":1,"op":5}', "malformed_request"),
    (b'{"v":1,"id":1,"op":"ping","extra":1}', "malformed_request"),
    (b'{"v":1,"id":1,"op":"launch_missiles"}', "unknown_op"),
    (b'{"v":1,"id":1,"op":"sign","args":{"key_id":"k"}}', "bad_request"),
    (b'{"v":1,"id":1,"op":"sign","args":{"key_id":"k","data":"aGk="}}', "bad_request"),
    (b'{"v":1,"id":1,"op":"sign","args":{"key_id":"k","data":{"$b":"!!"}}}',
     "malformed_request"),
    (b'{"v":1,"id":1,"op":"random","args":{"n":true}}', "bad_request"),
    (b'{"v":1,"id":1,"op":"ping","args":{"x":1}}', "bad_request"),
    (b"[" * 100000, "malformed_request"),
])
def test_malformed_requests_are_named(body: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(body)
    assert info.value.code == code and not info.value.fatal


@pytest.mark.parametrize("value, message", [(b'"!!"', "$b is not valid base64"),
                                            (b"5", "$b must be a base64 string")])
def test_bad_base64_is_a_named_malformed_request(value: bytes, message: str) -> None:
    body = b'{"v":1,"id":1,"op":"sign","args":{"key_id":"k","data":{"$b":' + value + b"}}}"
    with pytest.raises(ProtocolError) as info:
        decode_request(body)
    assert info.value.code == "malformed_request" and message in str(info.value)


def test_every_op_has_a_schema_of_known_types() -> None:
    for op, spec in OPS.items():
        assert op.isidentifier()
        for kind, required in spec.values():
            assert kind in "bsifl" and isinstance(required, bool)


# --- fuzzing -------------------------------------------------------------------------------


@given(st.binary(max_size=4096))
def test_fuzz_decoder_and_request_parser_only_raise_protocol_errors(data: bytes) -> None:
    decoder = FrameDecoder(max_body=2048)
    bodies, error = decoder.feed(data)
    assert error is None or error.fatal
    for body in [*bodies, data]:
        with contextlib.suppress(ProtocolError):
            decode_request(body)


@given(st.binary(max_size=2048))
def test_fuzz_bodies_inside_valid_frames(body: bytes) -> None:
    bodies, error = FrameDecoder().feed(frame(body))
    assert error is None and bodies == [body]
    try:
        request = decode_request(body)
    except ProtocolError:
        return
    assert request.op in OPS


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@given(st.sampled_from(sorted(OPS)), st.dictionaries(st.text(max_size=12), _json, max_size=5),
       st.integers())
def test_fuzz_structured_requests(op: str, args: dict[str, object], rid: int) -> None:
    body = json.dumps({"v": 1, "id": rid, "op": op, "args": args}).encode()
    try:
        request = decode_request(body)
    except ProtocolError as exc:
        assert exc.code in ("malformed_request", "bad_request")
        return
    assert set(request.args) <= set(OPS[op])


@given(st.lists(st.binary(max_size=300), max_size=6), st.lists(st.integers(1, 50), max_size=10))
def test_fuzz_any_split_of_a_stream_yields_the_same_frames(bodies: list[bytes],
                                                           cuts: list[int]) -> None:
    stream = b"".join(frame(b) for b in bodies)
    decoder, got, position = FrameDecoder(), [], 0
    for cut in [*cuts, len(stream)]:
        chunk = stream[position:position + cut]
        position += len(chunk)
        more, error = decoder.feed(chunk)
        assert error is None
        got += more
    more, _ = decoder.feed(stream[position:])
    assert got + more == bodies
