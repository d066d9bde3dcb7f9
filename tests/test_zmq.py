"""The ZMQ face through MPClient and through raw sockets sending garbage."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import msgspec
import pytest
import zmq

from lmcache import __version__
from lmcache import protocol as p
from lmcache.client import MPClient, ServerError, ServerUnavailableError
from lmcache.server.process import ServerProcess, free_port, lmcache_command


def test_hello_describes_the_server(client: MPClient, server: ServerProcess) -> None:
    hello = client.hello(client_name="test")
    assert hello.server_version == __version__
    assert hello.protocol_version == p.PROTOCOL_VERSION
    assert hello.chunk_size == 256
    assert isinstance(hello.transfer_modes, list)
    assert hello.server_id == client.status()["server"]["server_id"]


def test_ping_and_status_and_clear(client: MPClient) -> None:
    assert client.ping() == p.Pong()
    status = client.status()
    assert status["server"]["state"] == "ready"
    clears = status["l1"]["clears"]
    assert client.clear() == 0
    assert client.status()["l1"]["clears"] == clears + 1


def test_futures_complete_in_any_order(client: MPClient) -> None:
    futures = [client.submit(p.Ping()) for _ in range(50)]
    status_future = client.submit(p.Status())
    assert isinstance(status_future.result(), p.StatusReply)
    assert all(f.result() == p.Pong() for f in reversed(futures))
    assert all(f.done() for f in futures)


def test_many_threads_share_one_client(client: MPClient) -> None:
    errors: list[BaseException] = []
    counts = [0] * 8

    def worker(i: int) -> None:
        try:
            for _ in range(100):
                assert client.ping() == p.Pong()
                counts[i] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert counts == [100] * 8


def test_lmcache_ping_prints_hello_and_round_trip(server: ServerProcess) -> None:
    out = subprocess.run(
        [*lmcache_command(), "ping", "--host", "127.0.0.1", "--port", str(server.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f"version         {__version__}" in out.stdout
    assert "chunk size      256 tokens" in out.stdout
    assert "round trip" in out.stdout and " ms" in out.stdout


def test_lmcache_ping_fails_when_nobody_listens() -> None:
    out = subprocess.run(
        [*lmcache_command(), "ping", "--port", str(free_port()), "--timeout", "0.5"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 1
    assert "cannot reach the LMCache server" in out.stderr
    assert "Traceback" not in out.stderr


def test_client_times_out_clearly_without_a_server() -> None:
    with MPClient("127.0.0.1", free_port(), timeout_s=0.3) as c:
        with pytest.raises(ServerUnavailableError, match="cannot reach"):
            c.ping()


def test_client_times_out_when_the_server_does_not_answer() -> None:
    # A ROUTER that accepts the connection but never replies: the wait must end at the deadline.
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with MPClient("127.0.0.1", port, timeout_s=0.3) as c:
            with pytest.raises(ServerUnavailableError, match="no reply"):
                c.ping()
            assert c._pending == {}
    finally:
        silent.close(0)
        ctx.term()


# --- garbage ----------------------------------------------------------------------------


@pytest.fixture
def raw(server: ServerProcess):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(f"tcp://127.0.0.1:{server.port}")
    yield sock
    sock.close(0)
    ctx.term()


def _error(raw: zmq.Socket, frames: list[bytes]) -> tuple[bytes, p.Error]:
    raw.send_multipart(frames)
    request_id, body = raw.recv_multipart()
    reply = p.decode_reply(body)
    assert isinstance(reply, p.Error), reply
    return request_id, reply


@pytest.mark.parametrize(
    ("name", "message", "code", "text"),
    [
        ("random bytes", os.urandom(512), p.ErrorCode.BAD_MESSAGE, ""),
        ("empty message", b"", p.ErrorCode.BAD_MESSAGE, "cannot decode"),
        ("unknown tag", msgspec.msgpack.encode([77]), p.ErrorCode.BAD_MESSAGE, "unknown message id 77"),
        ("a reply, not a request", p.encode(p.Pong()), p.ErrorCode.BAD_MESSAGE, "is a reply"),
        ("wrong field types", msgspec.msgpack.encode([1, 5, 6]), p.ErrorCode.BAD_MESSAGE, "invalid Hello"),
        ("a map, not an array", msgspec.msgpack.encode({"type": 2}), p.ErrorCode.BAD_MESSAGE, ""),
        ("64 MiB frame", b"\x00" * (64 << 20), p.ErrorCode.TOO_LARGE, "limit"),
    ],
)
def test_garbage_gets_an_error_and_the_server_keeps_serving(
    raw: zmq.Socket, client: MPClient, name: str, message: bytes, code: p.ErrorCode, text: str
) -> None:
    request_id, error = _error(raw, [b"rid-1", message])
    assert request_id == b"rid-1"
    assert error.code == code
    assert text in error.message
    assert client.ping() == p.Pong()


def test_a_single_empty_frame_gets_an_envelope_error(raw: zmq.Socket, client: MPClient) -> None:
    request_id, error = _error(raw, [b""])
    assert request_id == b""
    assert error.code == p.ErrorCode.BAD_ENVELOPE
    assert client.ping() == p.Pong()


def test_an_oversized_request_id_is_refused(raw: zmq.Socket, client: MPClient) -> None:
    request_id, error = _error(raw, [b"x" * 1000, p.encode(p.Ping())])
    assert request_id == b""
    assert error.code == p.ErrorCode.BAD_ENVELOPE
    assert client.ping() == p.Pong()


def test_error_replies_raise_server_error(client: MPClient) -> None:
    future = client.submit_frames([msgspec.msgpack.encode([77])])
    with pytest.raises(ServerError) as info:
        future.result()
    assert info.value.code == p.ErrorCode.BAD_MESSAGE


def test_a_client_that_vanishes_does_not_disturb_others(server: ServerProcess, client: MPClient) -> None:
    for _ in range(20):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(f"tcp://127.0.0.1:{server.port}")
        sock.send_multipart([b"1", p.encode(p.Status())])
        sock.close(0)  # gone before the reply comes
        ctx.term()
    assert client.ping() == p.Pong()


def test_a_reply_that_arrived_before_anyone_waited_is_not_lost(client: MPClient) -> None:
    future = client.submit(p.Ping(), timeout=0.2)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:  # let the deadline pass without reading the socket
        pass
    assert future.result() == p.Pong()
