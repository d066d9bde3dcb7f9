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
        ("12 MiB frame", b"\x00" * (12 << 20), p.ErrorCode.TOO_LARGE, "limit"),
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


def test_a_frame_over_the_hard_limit_is_refused_before_it_is_buffered(raw: zmq.Socket, client: MPClient) -> None:
    # libzmq drops the peer at 2 x max_message_bytes (16 MiB) while reading the frame header,
    # so the 64 MiB never sit in the server; the DEALER reconnects and is served again.
    raw.send_multipart([b"big", b"\x00" * (64 << 20)])
    raw.send_multipart([b"after", p.encode(p.Ping())])
    request_id, body = raw.recv_multipart()
    assert request_id == b"after", "the oversized frame must get no reply"
    assert p.decode_reply(body) == p.Pong()
    assert client.ping() == p.Pong()


@pytest.mark.parametrize("count", [3, 4, 1000])
def test_extra_frames_get_an_envelope_error(raw: zmq.Socket, client: MPClient, count: int) -> None:
    request_id, error = _error(raw, [b"rid-x", p.encode(p.Ping()), *([b"\x01" * 1024] * (count - 2))])
    assert request_id == b"rid-x"
    assert error.code == p.ErrorCode.BAD_ENVELOPE
    assert f"got {count} frame(s)" in error.message
    assert client.ping() == p.Pong()


@pytest.mark.parametrize("message", [b"\x91\x91\x02", b"\x91\x80", b"\x92\x91\x01\xa1x", b"\x91\xcf" + b"\xff" * 8])
def test_a_message_id_that_is_not_an_integer_is_refused(raw: zmq.Socket, client: MPClient, message: bytes) -> None:
    # Regression: [[2]] (an array whose first item is an array) killed the loop thread.
    for _ in range(3):
        request_id, error = _error(raw, [b"rid-t", message])
        assert request_id == b"rid-t"
        assert error.code == p.ErrorCode.BAD_MESSAGE
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


def test_a_dead_loop_makes_the_server_unhealthy_and_stop(tmp_path) -> None:
    """Whatever kills the loop thread, /healthcheck must not go on answering healthy: the engine
    turns unhealthy at once and the process stops with status 1 (so a supervisor restarts it).
    In-process, with the loop's own socket torn down under it."""
    from lmcache.config import ServerConfig
    from lmcache.server.app import _Failure
    from lmcache.server.engine import CacheEngine
    from lmcache.server.metrics import ServerMetrics
    from lmcache.server.zmq_loop import ZmqServer

    config = ServerConfig(l1_size_gb=0.01, host="127.0.0.1", port=free_port(), http_port=free_port(), l1_shm=False)
    engine = CacheEngine(config)
    failure = _Failure()
    server = ZmqServer(config, engine, ServerMetrics(engine), on_failure=lambda r: failure.report(engine, r))
    try:
        server.start()
        engine.start()
        with MPClient("127.0.0.1", config.port) as c:
            assert c.ping() == p.Pong()
        assert engine.health() == (True, "ready")
        server._router.close(linger=0)  # the loop's poll now fails
        deadline = time.monotonic() + 10
        while engine.health()[0]:
            assert time.monotonic() < deadline, "the engine still says healthy"
            time.sleep(0.01)
        healthy, reason = engine.health()
        assert "ZMQ loop died" in reason
        assert failure.reason == reason
    finally:
        server.stop()
        engine.close()
