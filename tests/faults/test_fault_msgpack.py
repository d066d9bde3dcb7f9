"""Arbitrary msgpack values as the message frame, above all arrays whose first item (the slot of
the message id) is not an integer: [[2]], [{}], [[1, 2], "x"], [nan], [2**64 - 1]. Each one gets
exactly one reply on the same socket, within the deadline: an Error with code bad_message when
it is not a valid request, the request's reply when it happens to be one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fault_support import (
    REPLY_DEADLINE_S, LiveServer, Problems, RawDealer, decode_reply_frames, fuzz_settings, line_count,
    short_repr,
)
from lmcache import protocol as p

HOSTILE_INTS = [0, 1, -1, 2, 16, 99, 100, 127, 128, 255, 256, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
                -(2**31), -(2**63)]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1.5, 2.0, 1e308, 5e-324]
CONTROL_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # no lone surrogates: not UTF-8

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from(HOSTILE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE_FLOATS),
    CONTROL_TEXT,
    st.sampled_from(["", "\n", "\r\n", "\x00", "LMCache ERROR: forged", "\u2028", "☃" * 30]),
    st.binary(max_size=48),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=16)),
)
hashable_keys = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                          CONTROL_TEXT, st.binary(max_size=16),
                          st.tuples(st.integers(0, 5), CONTROL_TEXT))  # tuples encode as array keys
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=6), st.dictionaries(hashable_keys, children, max_size=4)),
    max_leaves=16,
)
containers = st.one_of(st.lists(values, max_size=4), st.dictionaries(hashable_keys, values, max_size=3))
frames = st.one_of(
    values,  # any value at all
    st.builds(lambda head, rest: [head, *rest], containers, st.lists(values, max_size=4)),  # id slot: array/map
    st.builds(lambda head, rest: [head, *rest], scalars, st.lists(values, max_size=4)),  # id slot: any scalar
    st.builds(lambda tag, rest: [tag, *rest], st.integers(0, 120), st.lists(values, max_size=6)),  # real ids, bad fields
).map(msgspec.msgpack.encode)


def _nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x02"


# Frames msgspec does not produce from Python values: deep nesting, array keys, truncation,
# trailing bytes, invalid UTF-8, lengths that claim gigabytes, reserved bytes.
CRAFTED = {
    "[[2]]": b"\x91\x91\x02",
    "[{}]": b"\x91\x80",
    "[[1, 2], 'x']": b"\x92\x92\x01\x02\xa1x",
    "[{[1]: 2}]": b"\x91\x81\x91\x01\x02",
    "[nil]": b"\x91\xc0",
    "[true]": b"\x91\xc3",
    "[nan]": b"\x91\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    "[2**64-1]": b"\x91\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    "[-2**63]": b"\x91\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    "[ext]": b"\x91\xd4\x01\x02",
    "[timestamp ext]": b"\x91\xd6\xff\x00\x00\x00\x00",
    "[bad timestamp ext]": b"\x91\xd6\xff\xff\xff\xff\xff",
    "[2] nested 100000 deep": b"\x91" * 100_000 + b"\x02",
    "[[...]] 100000 deep": _nested(100_000),
    "maps 50000 deep": b"\x81\xa1k" * 50_000 + b"\xc0",
    "truncated [2, 1": b"\x92\x02",
    "[2] + trailing": b"\x91\x02\x00",
    "[1, invalid utf-8]": b"\x92\x01\xa1\xff",
    "array32 claiming 2**32-1 items": b"\xdd\xff\xff\xff\xff\x02",
    "str32 claiming 4 GiB": b"\x91\xdb\xff\xff\xff\xff",
    "bin32 claiming 4 GiB": b"\x92\x01\xc6\xff\xff\xff\xff",
    "map32 claiming 2**32-1 pairs": b"\x91\xdf\xff\xff\xff\xff",
    "reserved byte 0xc1": b"\x91\xc1",
    "[5, [nil, 1, 0, '', ''], ...] (Lookup with a bad scope)": b"\x93\x05\x95\xc0\x01\x00\xa0\xa0\xc4\x00",
    "[8] (RegisterKVCache, no fields)": b"\x91\x08",
    "[100, 'internal', 'x'] (an Error, sent as a request)": b"\x93\x64\xa8internal\xa1x",
}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer()
    yield server
    server.close()


def _expected(frame: bytes) -> type | None:
    """The reply type a valid request gets; None when the frame is no valid request."""
    try:
        request = p.decode_request(frame)
    except Exception:  # noqa: BLE001 - ProtocolError; anything else is the decoder's bug, found elsewhere
        return None
    return type(request)


def _one_reply_problem(sock: RawDealer, request_id: bytes, frame: bytes) -> str | None:
    """Sends [request_id, frame]; what is wrong with the one reply it must get, or None."""
    reply, _ = sock.request([request_id, frame])
    if reply is None:
        return f"no reply within {REPLY_DEADLINE_S} s"
    try:
        got_id, decoded = decode_reply_frames(reply)
    except AssertionError as e:
        return str(e)
    if got_id != request_id:
        return f"the reply names request id {got_id!r}, not {request_id!r} (an extra or a lost reply)"
    if _expected(frame) is None:
        if not (isinstance(decoded, p.Error) and decoded.code is p.ErrorCode.BAD_MESSAGE):
            return f"an invalid message got {short_repr(decoded)}, not a bad_message Error"
    elif isinstance(decoded, p.Error) and decoded.code is p.ErrorCode.INTERNAL:
        return f"a valid request got an INTERNAL error: {decoded.message}"
    return None


def _no_more_replies(sock: RawDealer) -> str | None:
    extra = sock.recv(0.1)
    return None if extra is None else f"an extra reply arrived: {short_repr(extra)}"


def test_arbitrary_msgpack_gets_exactly_one_reply(live: LiveServer) -> None:
    problems = Problems()
    ids = itertools.count()
    held: dict[str, RawDealer | int] = {}

    @fuzz_settings(max_examples=300)
    @given(frames)
    def run(frame: bytes) -> None:
        if problems.gave_up:
            return
        assume(_expected(frame) is not p.Clear)  # valid, but would disturb nothing here worth it
        if held.get("port") != live.port:  # a replaced server: a new socket
            if "sock" in held:
                held["sock"].close()  # type: ignore[union-attr]
            held.update(sock=RawDealer(live.port), port=live.port)
        sock = held["sock"]
        assert isinstance(sock, RawDealer)
        first_line = line_count(live.server)
        request_id = next(ids).to_bytes(4, "big")
        symptom = _one_reply_problem(sock, request_id, frame)
        what = f"msgpack frame {short_repr(frame)} = {short_repr(_safe_decode(frame))}"
        if symptom is not None:
            problems.add(what, symptom)
            problems.check_server(live, what, first_line)

    try:
        run()
        if "sock" in held and not problems.gave_up:
            extra = _no_more_replies(held["sock"])  # type: ignore[arg-type]
            if extra:
                problems.add("the whole run", extra)
    finally:
        if "sock" in held:
            held["sock"].close()  # type: ignore[union-attr]
    problems.check_server(live, "after the whole run", 0)
    assert not problems, problems.report()


def _safe_decode(frame: bytes) -> object:
    try:
        return msgspec.msgpack.decode(frame)
    except Exception as e:  # noqa: BLE001 - only for the report
        return f"<undecodable: {type(e).__name__}>"


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_msgpack_gets_one_bad_message_error(live: LiveServer, name: str) -> None:
    frame = CRAFTED[name]
    first_line = line_count(live.server)
    with RawDealer(live.port) as sock:
        symptom = _one_reply_problem(sock, b"crafted", frame)
        symptom = symptom or _no_more_replies(sock)
    problems = Problems()
    if symptom:
        problems.add(name, symptom)
    problems.check_server(live, name, first_line)
    assert not problems, problems.report()
