"""The ZMQ loop is not just alive but serving, and its death cannot go unnoticed.

1. Messages whose first item is not a message id (msgpack [[2]], [{}], ...) once killed the loop
   thread while the process and /healthcheck carried on: each must now get a bad_message Error
   and the loop must keep serving.
2. After a barrage of every kind of fault (frames, msgpack, hostile requests, malformed HTTP),
   the loop answers promptly and in volume, its answers are fresh, and SIGTERM exits 0.
3. If the loop thread dies anyway (a fault planted by server_wrapper.py kills it with an
   exception no per-message handler catches), /healthcheck must stop saying healthy (503) and
   the process must exit with a non-zero status, so that a supervisor restarts it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from fault_support import (
    KILL_FRAME, PING_DEADLINE_S, REPLY_DEADLINE_S, LiveServer, Problems, RawDealer, decode_reply_frames, health,
    line_count, loop_death_lines, raw_http, start_server, tail,
)
from lmcache import protocol as p
from lmcache.client import MPClient
from lmcache.keys import CacheScope

# The frame from the bug report, byte for byte, and its family: a first item that is an array,
# a map, or any scalar that is not a small integer.
NOT_A_MESSAGE_ID = {
    "[[2]]": b"\x91\x91\x02",
    "[{}]": b"\x91\x80",
    "[[1, 2], 'x']": msgspec.msgpack.encode([[1, 2], "x"]),
    "[[2], 1, 2]": msgspec.msgpack.encode([[2], 1, 2]),
    "[{'a': 1}, 2]": msgspec.msgpack.encode([{"a": 1}, 2]),
    "[nil]": msgspec.msgpack.encode([None]),
    "[true]": msgspec.msgpack.encode([True]),
    "[1.0]": msgspec.msgpack.encode([1.0]),
    "[nan]": msgspec.msgpack.encode([float("nan")]),
    "['2']": msgspec.msgpack.encode(["2"]),
    "[b'2']": msgspec.msgpack.encode([b"\x02"]),
    "[-1]": msgspec.msgpack.encode([-1]),
    "[2**64-1]": msgspec.msgpack.encode([2**64 - 1]),
    "[ext]": msgspec.msgpack.encode([msgspec.msgpack.Ext(1, b"\x02")]),
}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    server = LiveServer(with_canary=True)
    yield server
    server.close()


@pytest.mark.parametrize("name", list(NOT_A_MESSAGE_ID))
def test_a_first_item_that_is_no_message_id_gets_an_error_and_the_loop_serves_on(live: LiveServer, name: str) -> None:
    first_line = line_count(live.server)
    problems = Problems()
    with RawDealer(live.port) as sock:
        reply, _ = sock.request([b"1", NOT_A_MESSAGE_ID[name]])
        if reply is None:
            problems.add(name, f"no reply within {REPLY_DEADLINE_S} s")
        else:
            request_id, decoded = decode_reply_frames(reply)
            if request_id != b"1" or not (isinstance(decoded, p.Error) and decoded.code is p.ErrorCode.BAD_MESSAGE):
                problems.add(name, f"reply {request_id!r} {decoded!r}, not [b'1', Error(bad_message)]")
        # The same socket is served afterwards too, not only fresh clients.
        again, _ = sock.request([b"2", p.encode(p.Ping())], timeout_s=PING_DEADLINE_S)
        if again is None or decode_reply_frames(again) != (b"2", p.Pong()):
            problems.add(name, f"the next Ping on the same socket got {again!r}")
    problems.check_server(live, name, first_line)
    assert not problems, problems.report()


def _barrage(live: LiveServer) -> None:
    """A few faults of every kind, as the other fault tests send them."""
    with RawDealer(live.port) as sock:
        for frames in (
            [b""], [b"x" * 100, b""], [b"1", b"\x91\x91\x02"], [b"1", b"\x91" * 100_000 + b"\x02"],
            [b"1", b"\x00" * (9 << 20)], [b"1", p.encode(p.Ping()), b"bulk"],
            [b"1", p.encode(p.Lookup(CacheScope("m", 2**40, 0), b"\x01" * 16, True))],
            [b"1", p.encode(p.Store("fault-canary", b"\x01" * 16, [2**63] * 4))],
            [b"1", p.encode(p.Retrieve("fault-canary", b"\x01" * 16, [0, 1, 2, 3], skip_blocks=-1))],
            [b"1", p.encode(p.CommitStore(2**63, [True]))],
        ):
            sock.send(frames)
    for data in (b"GET /health\x00check HTTP/1.1\r\n\r\n", b"\x16\x03\x01" + b"\x00" * 100,
                 b"POST /status HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"):
        raw_http(live.server.http_port, data, timeout_s=2)


def test_the_loop_serves_after_a_barrage_of_faults(live: LiveServer) -> None:
    try:
        _barrage(live)
        _assert_loop_serves(live)
    except AssertionError:
        live.restart()  # reported once, here: the module's later tests and teardown get a fresh server
        raise


def _assert_loop_serves(live: LiveServer) -> None:
    with MPClient("127.0.0.1", live.port, timeout_s=PING_DEADLINE_S) as client:
        # Serving, not merely alive: 200 Pings back to back, each well within the deadline ...
        worst = 0.0
        for _ in range(200):
            start = time.monotonic()
            try:
                assert client.ping() == p.Pong()
            except Exception as e:  # noqa: BLE001
                raise AssertionError(f"Ping failed after the barrage: {e}\n{tail(live.server.output(), 40)}") from None
            worst = max(worst, time.monotonic() - start)
        assert worst < PING_DEADLINE_S, f"a Ping took {worst:.2f} s"
        # ... answers that are computed now (uptime advances) ...
        first = client.status()["server"]["uptime_seconds"]
        deadline = time.monotonic() + 5
        while client.status()["server"]["uptime_seconds"] <= first:
            assert time.monotonic() < deadline, "Status keeps answering the same uptime"
        # ... and requests that reach the engine: the canary is found and loads back.
        assert live.canary is not None
        assert client.lookup(live.canary.registration.scope(), live.canary.hashes) == 2
    problem = live.problem()
    assert problem is None, f"{problem}\n{tail(live.server.output(), 40)}"
    assert not loop_death_lines(live.server), tail(live.server.output(), 40)


def test_a_dead_zmq_loop_fails_healthcheck_and_exits_non_zero() -> None:
    server = start_server(kill_frame=KILL_FRAME)
    try:
        assert health(server) == (200, {"status": "healthy"})
        with MPClient("127.0.0.1", server.port, timeout_s=PING_DEADLINE_S) as client:
            assert client.ping() == p.Pong()
        with RawDealer(server.port) as sock:
            sock.send([b"1", KILL_FRAME])
        # The loop is dead once the planted fault fires: from then on /healthcheck must not say
        # healthy, for as long as the process still answers HTTP at all.
        deadline = time.monotonic() + 10
        last: tuple[int, object] = (200, None)
        while time.monotonic() < deadline:
            last = health(server, timeout_s=1)
            if last[0] != 200 or server.proc.poll() is not None:
                break
        assert last[0] != 200, (
            f"10 s after the ZMQ loop died, /healthcheck still answers {last}\n{tail(server.output(), 30)}"
        )
        if last[0] != 0:  # the process still serves HTTP: it must say why it is unhealthy
            assert last[0] == 503 and isinstance(last[1], dict) and last[1].get("status") == "unhealthy", last
        # ... and the process stops by itself with a failure status.
        try:
            status = server.proc.wait(15)
        except Exception:  # noqa: BLE001 - reported below
            status = None
        assert status is not None, f"the process still runs 15 s after its ZMQ loop died\n{tail(server.output(), 30)}"
        assert status != 0, f"the process exited 0 after its ZMQ loop died\n{tail(server.output(), 30)}"
        assert "InjectedLoopDeath" in server.output(), "the loop's death was not logged"
    finally:
        if server.proc.poll() is None:
            server.stop(timeout_s=5)


def test_the_planted_fault_only_fires_on_its_frame() -> None:
    """The wrapper's killer must not fire on ordinary traffic, or the test above proves nothing
    about the server."""
    server = start_server(kill_frame=KILL_FRAME)
    try:
        with MPClient("127.0.0.1", server.port, timeout_s=PING_DEADLINE_S) as client:
            for _ in range(20):
                assert client.ping() == p.Pong()
            client.submit_frames([KILL_FRAME[:-1]]).wait(REPLY_DEADLINE_S)
            assert client.ping() == p.Pong()
        assert httpx.get(f"{server.http_url}/healthcheck", timeout=2).status_code == 200
    finally:
        assert server.stop(timeout_s=10) == 0
