"""MPClient: how everything outside the server talks to it (connector, simulator, CLI, tests).

RPC only: a socket, futures and typed calls. Moving an engine's pages is kv_transfer.py's job.

One DEALER socket. Each request gets a fresh request id and a ``ReplyFuture``; replies are
matched by id, so requests may be in flight concurrently and answered in any order. There is
no I/O thread: ZMQ sockets are not thread-safe, so whichever caller is waiting drives the
socket under a lock and hands other callers their replies. A single caller therefore pays
no thread hop per round trip, which keeps a round trip close to a bare ZMQ echo.

Every wait has a deadline. With ``IMMEDIATE`` set, nothing is queued for a server that is
not connected, so a request never reaches a server long after its caller gave up; ZMQ
reconnects by itself when the server comes back.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import zmq

from lmcache import __version__
from lmcache import protocol as p
from lmcache.config import zmq_endpoint
from lmcache.keys import CacheScope
from lmcache.log import init_logger

logger = init_logger(__name__)

R = TypeVar("R", bound=p.Reply)

# Longest time one waiter holds the socket before letting other threads in.
_POLL_SLICE_S = 0.005
# Timed-out requests whose late replies are still undone, at most.
_MAX_LATE = 1024


class ServerUnavailableError(ConnectionError):
    """The server did not answer in time (down, unreachable or overloaded)."""


class ServerError(RuntimeError):
    """The server answered with an Error reply."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message


class ReplyFuture:
    """The pending reply to one request."""

    __slots__ = ("_client", "_deadline", "_done", "_event", "_reply", "done_at", "request_id", "sent_at", "undo")

    def __init__(self, client: MPClient, request_id: bytes, deadline: float) -> None:
        self._client = client
        self._deadline = deadline
        self._event: threading.Event | None = None  # made only if a thread waits on another's pump
        self._reply: p.Reply | BaseException | None = None
        self._done = False
        self.sent_at = time.monotonic()
        self.done_at = 0.0  # time.monotonic() when the reply (or failure) was taken in
        self.request_id = request_id
        # What to send back if the reply comes after its caller gave up: a request that hands
        # the server back what the late reply granted (lmcache_driven slots and locks).
        self.undo: Callable[[p.Reply], p.Request | None] | None = None

    def done(self) -> bool:
        """True once the reply (or a failure) is in; never blocks."""
        if not self._done:
            self._client._pump(block=False)
        return self._done

    def wait(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds; True once done. Unlike ``result``, a short wait does
        not give up on the request: only the request's own deadline fails it."""
        self._client._wait(self, min(time.monotonic() + timeout, self._deadline))
        return self._done

    def result(self, timeout: float | None = None) -> p.Reply:
        """The reply; raises ServerError for an Error reply, ServerUnavailableError on timeout.

        ``timeout`` defaults to what is left of the deadline set when the request was sent.
        """
        deadline = self._deadline if timeout is None else time.monotonic() + timeout
        self._client._wait(self, deadline)
        reply = self._reply
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, p.Error):
            raise ServerError(reply.code, reply.message)
        assert reply is not None
        return reply

    def _set(self, reply: p.Reply | BaseException) -> None:
        self._reply = reply
        self.done_at = time.monotonic()
        self._done = True
        event = self._event
        if event is not None:
            event.set()

    def _wait_for_other_thread(self, timeout_s: float) -> None:
        if self._event is None:
            self._event = threading.Event()
            if self._done:  # set between the check and the event's creation
                return
        self._event.wait(timeout_s)


def _curve_keys(
    server_key: str | bytes | None, client_secret_file: str | None
) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) z85 keys, or None when CurveZMQ is off."""
    if not server_key:
        if client_secret_file:
            raise ValueError("curve_client_secret_file needs curve_server_key (the server's public key)")
        return None
    from lmcache.security import client_keypair, server_public_key

    return (server_public_key(server_key), *client_keypair(client_secret_file))


class MPClient:
    def __init__(
        self,
        host: str = "localhost",
        port: int = 5555,
        timeout_s: float = 5.0,
        *,
        curve_server_key: str | bytes | None = None,
        curve_client_secret_file: str | None = None,
        observe: Callable[[p.Request, ReplyFuture], None] | None = None,
    ) -> None:
        """``curve_server_key`` (z85 text or the path of the server's certificate) turns on
        CurveZMQ for a server started with ``--curve-secret-key``; ``curve_client_secret_file``
        (a .key_secret file) is this client's identity for ``--curve-authorized-keys``. A bad
        key raises ``lmcache.security.KeyFileError`` (a ValueError) here, before any I/O.
        ``observe(request, future)`` sees every request sent (the simulator times Lookups)."""
        self.endpoint = zmq_endpoint(host, port)
        self.timeout_s = timeout_s
        self._observe = observe
        curve = _curve_keys(curve_server_key, curve_client_secret_file)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        # Waiting is a blocking recv bounded by this slice: cheaper than a poll per round trip.
        self._sock.setsockopt(zmq.RCVTIMEO, int(_POLL_SLICE_S * 1000))
        if curve is not None:  # must precede connect: the handshake mechanism is fixed per connection
            self._sock.curve_serverkey, self._sock.curve_publickey, self._sock.curve_secretkey = curve
        self._sock.connect(self.endpoint)
        self._lock = threading.Lock()
        self._pending: dict[bytes, ReplyFuture] = {}
        self._late: dict[bytes, Callable[[p.Reply], p.Request | None]] = {}  # timed-out requests to undo
        self._ids = itertools.count(1)
        self._closed = False

    # --- typed calls ----------------------------------------------------------------------

    def hello(self, client_name: str = "", timeout: float | None = None) -> p.HelloReply:
        return self.call(p.Hello(__version__, client_name), p.HelloReply, timeout)

    def ping(self, timeout: float | None = None) -> p.Pong:
        return self.call(p.Ping(), p.Pong, timeout)

    def status(self, timeout: float | None = None) -> dict:
        return self.call(p.Status(), p.StatusReply, timeout).status

    def clear(self, timeout: float | None = None) -> int:
        return self.call(p.Clear(), p.ClearReply, timeout).cleared_objects

    def lookup(
        self,
        scope: CacheScope,
        hashes: bytes,
        all_ranks: bool = False,
        lock: bool = False,
        session: str = "",
        timeout: float | None = None,
    ) -> int:
        """Leading chunks of ``hashes`` cached under ``scope``."""
        return self.call(p.Lookup(scope, hashes, all_ranks, lock, session), p.LookupReply, timeout).hit_chunks

    def release_locks(self, session: str, hashes: bytes = b"", timeout: float | None = None) -> int:
        return self.call(p.ReleaseLocks(session, hashes), p.Released, timeout).locks

    def end_session(self, session: str, timeout: float | None = None) -> int:
        return self.call(p.EndSession(session), p.Released, timeout).locks

    # --- generic --------------------------------------------------------------------------

    def call(
        self, request: p.Request, expect: type[R], timeout: float | None = None,
        undo: Callable[[p.Reply], p.Request | None] | None = None,
    ) -> R:
        """Sends ``request`` and waits for its reply, which must be of type ``expect``. ``undo``
        turns a reply that arrives after the timeout into a request handing back what it granted."""
        future = self.submit(request, timeout)
        future.undo = undo
        reply = future.result()
        if not isinstance(reply, expect):
            raise ServerError(p.ErrorCode.BAD_MESSAGE, f"expected {expect.__name__}, got {type(reply).__name__}")
        return reply

    def submit(self, request: p.Request, timeout: float | None = None, wait_to_send: bool = True) -> ReplyFuture:
        """Sends ``request`` now; the returned future completes when its reply arrives.

        With ``wait_to_send=False`` it never waits for a connection: if the server is not
        connected it raises ServerUnavailableError at once (for callers that must not block).
        """
        future = self.submit_frames([p.encode(request)], timeout, wait_to_send)
        if self._observe is not None:
            self._observe(request, future)
        return future

    def submit_frames(self, frames: list[bytes], timeout: float | None = None, wait_to_send: bool = True) -> ReplyFuture:
        """Sends pre-encoded message frames (the message and any bulk frames)."""
        if self._closed:
            raise RuntimeError("MPClient is closed")
        deadline = time.monotonic() + (self.timeout_s if timeout is None else timeout)
        request_id = next(self._ids).to_bytes(8, "little")
        future = ReplyFuture(self, request_id, deadline)
        with self._lock:
            self._pending[request_id] = future
            try:
                self._send_locked([request_id, *frames], deadline if wait_to_send else 0.0)
            except BaseException:
                del self._pending[request_id]
                raise
        return future

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for future in self._pending.values():
                future._set(ServerUnavailableError("MPClient was closed"))
            self._pending.clear()
            self._sock.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> MPClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- socket driving (callers hold no lock) ---------------------------------------------

    def _send_locked(self, frames: list[bytes], deadline: float) -> None:
        while True:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again:  # not connected yet (IMMEDIATE) or the send queue is full
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._sock.poll(max(1, int(remaining * 1000)), zmq.POLLOUT):
                    raise ServerUnavailableError(
                        f"cannot reach the LMCache server at {self.endpoint} "
                        "(is `lmcache server` running?)"
                    ) from None

    def _wait(self, future: ReplyFuture, deadline: float) -> None:
        while not future._done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._drain()  # a reply may have arrived while nobody was reading the socket
                if future._done:
                    return
                if time.monotonic() < future._deadline and deadline < future._deadline:
                    return  # a bounded wait ended; the request itself is still pending
                with self._lock:
                    if self._pending.pop(future.request_id, None) is not None and future.undo is not None:
                        self._late[future.request_id] = future.undo
                        while len(self._late) > _MAX_LATE:
                            del self._late[next(iter(self._late))]
                if not future._done:
                    future._set(ServerUnavailableError(
                        f"no reply from the LMCache server at {self.endpoint} within the timeout"
                    ))
                return
            if not self._pump(block=True):
                # Another thread is driving the socket and will hand us our reply.
                future._wait_for_other_thread(min(remaining, _POLL_SLICE_S))

    def _pump(self, block: bool) -> bool:
        """Receives one reply, waiting up to one slice for it if ``block``; returns False (doing
        nothing) if another thread is driving the socket."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if not self._closed:
                self._deliver(self._sock.recv_multipart(0 if block else zmq.NOBLOCK))
        except zmq.Again:
            pass
        finally:
            self._lock.release()
        return True

    def _drain(self) -> None:
        """Delivers every reply already received, without waiting (skipped if another thread is
        driving the socket: it delivers them)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            while not self._closed:
                self._deliver(self._sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            pass
        finally:
            self._lock.release()

    def _undo_late(self, undo: Callable[[p.Reply], p.Request | None], frame: bytes) -> None:
        """A reply whose caller timed out granted something (slots, locks): hand it back now,
        without waiting (the lock is held; the answer to this request is dropped)."""
        try:
            request = undo(p.decode_reply(frame))
            if request is not None:
                self._sock.send_multipart([next(self._ids).to_bytes(8, "little"), p.encode(request)], zmq.NOBLOCK)
        except (p.ProtocolError, zmq.ZMQError):
            pass  # the server is gone or unreachable: what it granted went with it

    def _deliver(self, frames: list[bytes]) -> None:
        future = self._pending.pop(frames[0], None)
        if future is None:
            undo = self._late.pop(frames[0], None)
            if undo is not None and len(frames) == 2:
                self._undo_late(undo, frames[1])
            return  # the caller timed out, or the server answered a request it could not parse
        if len(frames) != 2:
            future._set(ServerError(p.ErrorCode.BAD_ENVELOPE, f"reply has {len(frames)} frames, expected 2"))
            return
        try:
            future._set(p.decode_reply(frames[1]))
        except p.ProtocolError as e:
            future._set(ServerError(e.code, e.message))
