"""The ZMQ face: a ROUTER socket served by one thread with a blocking poller.

The thread sleeps in ``poll()`` until a request or a stop signal arrives (no timeouts, no
busy loop), decodes each request, calls the CacheEngine and replies on the same socket. A
bad request gets an ``Error`` reply and never disturbs the loop; a reply to a peer that has
gone is dropped by ZMQ. A per-message asyncio design measured 4-7x slower than this plain
thread, which is why the loop does not share Sanic's event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq

from lmcache import __version__
from lmcache import protocol as p
from lmcache.config import ServerConfig
from lmcache.log import init_logger
from lmcache.server.engine import CacheEngine, RequestError
from lmcache.server.metrics import ServerMetrics

logger = init_logger(__name__)

# Frames above this are refused by libzmq itself (the peer is disconnected) before they are
# buffered; frames between config.max_message_bytes and this get a polite Error reply.
HARD_FRAME_LIMIT = 256 << 20


class PortInUseError(OSError):
    def __init__(self, what: str, host: str, port: int, flag: str) -> None:
        super().__init__(f"{what} port {port} on {host} is already in use (change it with {flag})")


class ZmqServer:
    """Binds on construction (so a busy port fails early), serves on ``start()``."""

    def __init__(self, config: ServerConfig, engine: CacheEngine, metrics: ServerMetrics) -> None:
        self._config = config
        self._engine = engine
        self._metrics = metrics
        self._handlers: dict[type, Callable[[p.Request], p.Reply]] = {
            p.Hello: self._hello,
            p.Ping: lambda _: p.Pong(),
            p.Status: lambda _: p.StatusReply(engine.status()),
            p.Clear: lambda _: p.ClearReply(engine.clear()),
            p.Lookup: lambda r: p.LookupReply(engine.lookup(r.scope, r.hashes, r.all_ranks, r.lock, r.session)),
            p.ReleaseLocks: lambda r: p.Released(engine.release_locks(r.session, r.hashes)),
            p.EndSession: lambda r: p.Released(engine.end_session(r.session)),
        }
        self._request_counters = {
            cls: metrics.zmq_requests.labels(message=cls.__name__) for cls in self._handlers
        }
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_LIMIT)
        try:
            self._router.bind(config.endpoint)
        except zmq.ZMQError as e:
            self._close_sockets()
            if e.errno == zmq.EADDRINUSE:
                raise PortInUseError("ZMQ", config.host, config.port, "--port") from None
            raise OSError(f"cannot listen for ZMQ on {config.endpoint}: {e}") from None
        # The stop signal travels over an inproc pair so the poller needs no timeout.
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(f"inproc://lmcache-stop-{id(self)}")
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(f"inproc://lmcache-stop-{id(self)}")
        self._thread = threading.Thread(target=self._run, name="lmcache-zmq", daemon=True)
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stops the loop and closes every socket; idempotent."""
        if self._ctx.closed:
            return
        if self._thread.is_alive():
            self._wake_tx.send(b"")
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("ZMQ loop did not stop within %.1f s", timeout_s)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for name in ("_router", "_wake_rx", "_wake_tx"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()

    # --- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        router, wake = self._router, self._wake_rx
        while True:
            for sock, _ in poller.poll():
                if sock is wake:
                    return
            # One message per poll: asking ZMQ whether more are queued costs more than polling.
            frames = router.recv_multipart(zmq.NOBLOCK)  # copies: faster than Frames when small
            request_id, reply = self._handle(frames)
            try:
                router.send_multipart((frames[0], request_id, p.encode(reply)), zmq.NOBLOCK)
            except zmq.Again:
                logger.warning("Dropped a reply: the client is not reading its replies")

    def _handle(self, frames: list[bytes]) -> tuple[bytes, p.Reply]:
        """(request id, reply) for one ROUTER message ``[identity, request id, message, *bulk]``."""
        request_id = b""
        try:
            if len(frames) < 3:
                raise p.ProtocolError(
                    p.ErrorCode.BAD_ENVELOPE,
                    f"expected [request id, message] frames, got {len(frames) - 1} frame(s)",
                )
            if len(frames[1]) > p.MAX_REQUEST_ID_BYTES:
                raise p.ProtocolError(
                    p.ErrorCode.BAD_ENVELOPE,
                    f"request id is {len(frames[1])} bytes; the limit is {p.MAX_REQUEST_ID_BYTES}",
                )
            request_id = frames[1]
            size = len(frames[2]) if len(frames) == 3 else sum(map(len, frames[2:]))
            if size > self._config.max_message_bytes:
                raise p.ProtocolError(
                    p.ErrorCode.TOO_LARGE,
                    f"request is {size} bytes; the limit is {self._config.max_message_bytes}",
                )
            request = p.decode_request(frames[2])
            self._request_counters[type(request)].inc()
            return request_id, self._handlers[type(request)](request)
        except p.ProtocolError as e:
            reply = e.to_reply()
        except RequestError as e:
            reply = p.Error(p.ErrorCode.BAD_REQUEST, str(e))
        except Exception as e:  # a bug in a handler must not take the loop down
            logger.exception("Request failed")
            reply = p.Error(p.ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        self._metrics.zmq_errors.labels(code=reply.code.value).inc()
        logger.debug("Error reply %s: %s", reply.code.value, reply.message)
        return request_id, reply

    # --- handlers -------------------------------------------------------------------------

    def _hello(self, request: p.Hello) -> p.HelloReply:
        if request.client_name:
            logger.info("Hello from %s (version %s)", request.client_name, request.client_version or "?")
        return p.HelloReply(
            server_version=__version__,
            protocol_version=p.PROTOCOL_VERSION,
            server_id=self._engine.server_id,
            chunk_size=self._config.chunk_size,
            transfer_modes=list(self._engine.TRANSFER_MODES),
        )
