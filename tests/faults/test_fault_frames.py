"""Arbitrary multipart messages from a raw DEALER socket: batches of 1..6 frames of arbitrary
bytes (empty frames, a near-valid message frame, frames up to 8 MiB). Whatever arrives, the
server answers only with well-formed replies to request ids it was sent, never with an
internal error, and after every batch it still serves: a fresh client's Ping within a second,
/healthcheck healthy, and two chunks stored before the fuzzing load back byte for byte.

A DEALER cannot send a message of zero frames, so 1 frame is the smallest case (the server
sees [identity, frame]).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fault_support import (
    REPLY_DEADLINE_S, LiveServer, Problems, RawDealer, fuzz_settings, line_count, short_repr,
)
from lmcache import protocol as p
from lmcache.keys import CacheScope

MAX_MESSAGE_BYTES = 8 << 20  # the server's default --max-message-bytes

# Frames that are almost right: valid messages, the loop killer [[2]], an unknown id, a reply.
NEAR_VALID = [
    p.encode(p.Ping()),
    p.encode(p.Status()),
    p.encode(p.Hello("x", "fault-frames")),
    p.encode(p.Lookup(CacheScope("fault-canary"), b"\x01" * 16)),
    p.encode(p.Pong()),
    b"\x91\x91\x02",  # [[2]]
    b"\x91\x80",  # [{}]
    msgspec.msgpack.encode([77]),
    msgspec.msgpack.encode([2, 1, 2, 3]),
    b"\x92\x02",  # truncated array
]


def _long_frame(size: int, seed: int, random_bytes: bool) -> bytes:
    """A long frame built outside hypothesis (drawing megabytes byte by byte is slow)."""
    if random_bytes:
        return random.Random(seed).randbytes(size)
    return bytes([seed % 256]) * size


small_frames = st.one_of(st.binary(max_size=96), st.sampled_from(NEAR_VALID), st.just(b""))
long_frames = st.builds(
    _long_frame,
    st.sampled_from([65, 4096, 65536, 1 << 20, (4 << 20) + 3, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1]),
    st.integers(0, 2**16),
    st.booleans(),
)


@st.composite
def messages(draw: st.DrawFn) -> list[bytes]:
    """1..6 frames; at most one long one, so a batch stays under ~50 MiB."""
    frames = draw(st.lists(small_frames, min_size=1, max_size=6))
    if len(frames) >= 2 and draw(st.booleans()):  # the message slot: near-valid more often
        frames[1] = draw(st.sampled_from(NEAR_VALID))
    if draw(st.integers(0, 4)) == 0:
        frames[draw(st.integers(0, len(frames) - 1))] = draw(long_frames)
    return frames


def _would_clear(frames: list[bytes]) -> bool:
    """A message that validly clears or unregisters would (rightly) lose the canary chunks."""
    if len(frames) < 2 or len(frames[0]) > p.MAX_REQUEST_ID_BYTES:
        return False
    try:
        request = p.decode_request(frames[1])
    except Exception:  # noqa: BLE001 - ProtocolError; anything else is the decoder's bug, found elsewhere
        return False
    return isinstance(request, (p.Clear, p.UnregisterKVCache, p.RegisterKVCache))


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer(with_canary=True)
    yield server
    server.close()


def _collect_replies(sock: RawDealer, expected: int) -> list[list[bytes]]:
    """Replies until ``expected`` came, or the deadline passed, or none came for half a second."""
    replies: list[list[bytes]] = []
    deadline = time.monotonic() + REPLY_DEADLINE_S
    while len(replies) < expected and (left := deadline - time.monotonic()) > 0:
        reply = sock.recv(min(left, 0.5))
        if reply is None:
            break
        replies.append(reply)
    return replies


def _reply_problems(batch: list[list[bytes]], replies: list[list[bytes]]) -> list[str]:
    """What is wrong with the replies to ``batch`` (the server may drop some garbage)."""
    problems = []
    sent_ids = {frames[0] for frames in batch if len(frames) >= 2 and len(frames[0]) <= p.MAX_REQUEST_ID_BYTES}
    if len(replies) > len(batch):
        problems.append(f"{len(replies)} replies to {len(batch)} messages")
    for reply in replies:
        if len(reply) != 2:
            problems.append(f"a reply of {len(reply)} frames: {short_repr(reply)}")
            continue
        request_id, body = reply
        if request_id != b"" and request_id not in sent_ids:
            problems.append(f"a reply to request id {request_id!r}, which was never sent")
        try:
            decoded = p.decode_reply(body)
        except p.ProtocolError as e:
            problems.append(f"an undecodable reply {short_repr(body)}: {e}")
            continue
        if isinstance(decoded, p.Error) and decoded.code is p.ErrorCode.INTERNAL:
            problems.append(f"an INTERNAL error reply: {decoded.message}")
    return problems


def test_arbitrary_frames_never_disturb_the_server(live: LiveServer) -> None:
    problems = Problems()
    batch_numbers = itertools.count()

    @fuzz_settings(max_examples=60)
    @given(st.lists(messages(), min_size=1, max_size=5))
    @example([[b"1", b"\x91\x91\x02"]])  # the frames that once killed the loop, always tried
    @example([[b""], [b"x" * 65, b"\x91\x80"], [b"2", b"\x91\x80", b""]])
    def run(batch: list[list[bytes]]) -> None:
        if problems.gave_up:
            return
        batch = [frames for frames in batch if not _would_clear(frames)]
        if not batch:
            return
        first_line = line_count(live.server)
        with RawDealer(live.port) as sock:
            for frames in batch:
                sock.send(frames)
            replies = _collect_replies(sock, len(batch))
        what = f"batch {next(batch_numbers)}: " + "; ".join(short_repr(frames) for frames in batch)
        for symptom in _reply_problems(batch, replies):
            problems.add(what, symptom)
        problems.check_server(live, what, first_line)

    run()
    assert not problems, problems.report()


Outcome = type | p.ErrorCode  # a reply type, or the code of an Error


def test_each_envelope_error_is_answered_to_the_right_request_id(live: LiveServer) -> None:
    """The cases whose reply the protocol fixes: one frame (no request id), an oversized request
    id, too many bytes, frames beyond [request id, message] (bulk frames: served, or refused as
    a bad envelope, but answered to their request id)."""
    ping = p.encode(p.Ping())
    half = b"\x00" * (MAX_MESSAGE_BYTES // 2)
    cases: list[tuple[list[bytes], bytes, tuple[Outcome, ...]]] = [
        ([b""], b"", (p.ErrorCode.BAD_ENVELOPE,)),
        ([b"only-an-id"], b"", (p.ErrorCode.BAD_ENVELOPE,)),
        ([b"x" * (p.MAX_REQUEST_ID_BYTES + 1), ping], b"", (p.ErrorCode.BAD_ENVELOPE,)),
        ([b"x" * p.MAX_REQUEST_ID_BYTES, ping], b"x" * p.MAX_REQUEST_ID_BYTES, (p.Pong,)),
        ([b"", ping], b"", (p.Pong,)),
        ([b"big", b"\x00" * (MAX_MESSAGE_BYTES + 1)], b"big", (p.ErrorCode.TOO_LARGE,)),
        ([b"split", ping, half, half], b"split", (p.ErrorCode.TOO_LARGE, p.ErrorCode.BAD_ENVELOPE)),
        ([b"bulk", ping, b"", b"junk"], b"bulk", (p.Pong, p.ErrorCode.BAD_ENVELOPE)),
        ([b"many", ping, *[b"f"] * 1000], b"many", (p.Pong, p.ErrorCode.BAD_ENVELOPE)),
        ([b"empty", b""], b"empty", (p.ErrorCode.BAD_MESSAGE,)),
    ]
    failures = []
    with RawDealer(live.port) as sock:
        for frames, want_id, wanted in cases:
            reply, _ = sock.request(frames)
            if reply is None:
                failures.append(f"{short_repr(frames)}: no reply within {REPLY_DEADLINE_S} s")
                continue
            if len(reply) != 2 or reply[0] != want_id:
                failures.append(f"{short_repr(frames)}: reply {short_repr(reply)}, wanted request id {want_id!r}")
                continue
            decoded = p.decode_reply(reply[1])
            got: Outcome = decoded.code if isinstance(decoded, p.Error) else type(decoded)
            if got not in wanted:
                failures.append(f"{short_repr(frames)}: got {short_repr(decoded)}, wanted one of {wanted}")
    assert not failures, "\n".join(failures)
    problem = live.problem()
    assert problem is None, problem
