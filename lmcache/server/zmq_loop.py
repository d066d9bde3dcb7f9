"""The ZMQ face: a ROUTER socket served by one thread with a blocking poller.

The thread sleeps in ``poll()`` until a request, a finished copy or a stop signal arrives (no
timeouts, no busy loop), decodes each request, calls the CacheEngine and replies on the same
socket. Store and Retrieve copy bytes, so they run on ``--max-workers`` threads; their replies
come back through a queue and an inproc doorbell, because only this thread may touch the
ROUTER socket. Ping and Lookup therefore answer while big copies run. A bad request gets an
``Error`` reply and never disturbs the loop; a reply to a peer that has gone is dropped by ZMQ.
A per-message asyncio design measured 4-7x slower than this plain thread, which is why the loop
does not share Sanic's event loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from lmcache import __version__
from lmcache import protocol as p
from lmcache.config import ServerConfig
from lmcache.log import init_logger
from lmcache.security import KeyFileError, is_loopback, load_keypair
from lmcache.server.engine import CacheEngine, RetrieveResult, SlotGrant, StoreResult
from lmcache.server.errors import RequestError, UnknownInstanceError
from lmcache.server.metrics import ServerMetrics

logger = init_logger(__name__)

# A message is [identity, request id, message frame]; see _receive.
_KEPT_FRAMES = 3


def hard_frame_limit(config: ServerConfig) -> int:
    """Frames above this are refused by libzmq itself (the peer is disconnected) before they are
    buffered; frames between ``config.max_message_bytes`` and this get a polite Error reply."""
    return 2 * config.max_message_bytes


class PortInUseError(OSError):
    def __init__(self, what: str, host: str, port: int, flag: str) -> None:
        super().__init__(f"{what} port {port} on {host} is already in use (change it with {flag})")


class ZmqServer:
    """Binds on construction (so a busy port fails early), serves on ``start()``."""

    def __init__(
        self, config: ServerConfig, engine: CacheEngine, metrics: ServerMetrics,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        """``on_failure(reason)`` is called (on the loop thread) if the loop ever dies."""
        self._config = config
        self._on_failure = on_failure or (lambda reason: None)
        self._engine = engine
        self._metrics = metrics
        self._handlers: dict[type, Callable[[Any], p.Reply]] = {
            p.Hello: self._hello,
            p.Ping: lambda _: p.Pong(),
            p.Status: lambda _: p.StatusReply(status=engine.status()),
            p.Clear: lambda _: p.ClearReply(cleared_objects=engine.clear()),
            p.Lookup: lambda r: p.LookupReply(
                hit_chunks=engine.lookup(r.scope, r.hashes, r.all_ranks, r.lock, r.session, load=self._off_loop()),
                chunk_size=config.chunk_size,
            ),
            p.ReleaseLocks: lambda r: p.Released(locks=engine.release_locks(r.session, r.hashes)),
            p.EndSession: lambda r: p.Released(locks=engine.end_session(r.session)),
            p.RegisterKVCache: lambda r: p.Registered(**engine.register_kv_cache(r)._asdict()),
            p.UnregisterKVCache: self._unregister,
            p.Store: lambda r: _store_reply(
                engine.store(r.instance_id, r.hashes, r.block_ids, r.salt, r.event, r.deadline)
            ),
            p.Retrieve: lambda r: _retrieve_reply(
                engine.retrieve(r.instance_id, r.hashes, r.block_ids, r.skip_blocks, r.salt, r.event, r.deadline)
            ),
            p.PrepareStore: lambda r: _slots(engine.prepare_store(r.instance_id, r.hashes, r.salt)),
            p.CommitStore: lambda r: _store_reply(engine.commit_store(r.ticket, r.ok, r.instance_id)),
            p.PrepareRetrieve: lambda r: _slots(engine.prepare_retrieve(r.instance_id, r.hashes, r.salt)),
            p.FinishRetrieve: lambda r: p.Released(locks=engine.finish_retrieve(r.ticket, r.instance_id)),
            p.Fence: lambda r: p.Fenced(event=engine.fence(r.instance_id)),
        }
        # Slow requests run off the loop thread: copies on the workers, (un)registration on a
        # thread of its own (mapping SHM segments or pinning L1 for a GPU can take seconds, and
        # must not queue behind other engines' copies). A Fence or an Unregister runs after
        # every earlier request of its engine: the Fence's event is recorded behind any copy
        # those queued, and an Unregister never overtakes its own Register.
        self._slow: set[type] = {p.Store, p.Retrieve, p.RegisterKVCache, p.UnregisterKVCache, p.Fence}
        # With L2 tiers a Lookup may wait for chunks loading from them: off the loop thread, on
        # threads of their own (never queued behind big copies).
        self._lookups: ThreadPoolExecutor | None = None
        if engine.l2 is not None:
            self._lookups = ThreadPoolExecutor(4, thread_name_prefix="lmcache-lookup")
        self._in_flight: dict[str | tuple[str, str], list[Future]] = {}  # per engine instance, in arrival order (loop thread only)
        self._workers = ThreadPoolExecutor(config.max_workers, thread_name_prefix="lmcache-worker")
        self._registrar = ThreadPoolExecutor(1, thread_name_prefix="lmcache-register")
        self._outbox: queue.SimpleQueue[tuple[bytes, bytes, p.Reply]] = queue.SimpleQueue()
        self._bell_lock = threading.Lock()
        self._request_counters = {
            cls: metrics.zmq_requests.labels(message=cls.__name__) for cls in self._handlers
        }
        # Read again here (ServerConfig only checked it) so that no config object holds a secret key.
        try:
            curve_keys = load_keypair(config.curve_secret_key) if config.curve_secret_key else None
        except KeyFileError as e:
            raise OSError(f"--curve-secret-key: {e}") from None
        self._authenticator: ThreadAuthenticator | None = None
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, hard_frame_limit(config))
        if curve_keys is not None:
            # Before bind: the mechanism of every connection is fixed when it is accepted.
            self._router.curve_publickey, self._router.curve_secretkey = curve_keys
            self._router.curve_server = True
            if config.curve_authorized_keys:
                # Also before bind: with no ZAP handler on the context, libzmq lets any CURVE client in.
                self._authenticator = ThreadAuthenticator(self._ctx, log=init_logger("lmcache.server.zap"))
                self._authenticator.start()
                self._authenticator.configure_curve(domain="*", location=config.curve_authorized_keys)
        elif not is_loopback(config.host):
            logger.warning(
                "The ZMQ port %s is unauthenticated and unencrypted: anyone who can reach it can read, "
                "store and clear the cache. Use --curve-secret-key (see the Security section of the README)",
                config.endpoint,
            )
        try:
            self._router.bind(config.endpoint)
        except zmq.ZMQError as e:
            self._close_sockets()
            if e.errno == zmq.EADDRINUSE:
                raise PortInUseError("ZMQ", config.host, config.port, "--port") from None
            raise OSError(f"cannot listen for ZMQ on {config.endpoint}: {e}") from e
        # The stop signal travels over an inproc pair so the poller needs no timeout.
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        self._wake_rx.bind(f"inproc://lmcache-stop-{id(self)}")
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_tx.connect(f"inproc://lmcache-stop-{id(self)}")
        self._bell_rx = self._ctx.socket(zmq.PULL)
        self._bell_rx.bind(f"inproc://lmcache-replies-{id(self)}")
        self._bell_tx = self._ctx.socket(zmq.PUSH)
        self._bell_tx.connect(f"inproc://lmcache-replies-{id(self)}")
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
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._registrar.shutdown(wait=True, cancel_futures=True)
        if self._lookups is not None:
            self._lookups.shutdown(wait=True, cancel_futures=True)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for name in ("_router", "_wake_rx", "_wake_tx", "_bell_rx", "_bell_tx"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if self._authenticator is not None:  # its ZAP socket lives in our context: term() would wait on it
            self._authenticator.stop()
            self._authenticator = None
        self._ctx.term()

    # --- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - reported, then the process stops
            logger.critical("The ZMQ loop died (%s: %s); the server stops", type(e).__name__, e, exc_info=True)
            self._on_failure(f"the ZMQ loop died: {type(e).__name__}: {e}")

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        poller.register(self._bell_rx, zmq.POLLIN)
        router, wake, bell = self._router, self._wake_rx, self._bell_rx
        while True:
            for sock, _ in poller.poll():
                if sock is wake:
                    return
                if sock is bell:
                    bell.recv(zmq.NOBLOCK)
                    try:
                        self._send_finished()
                    except Exception:  # noqa: BLE001 - one bad reply must not take the loop down
                        logger.exception("Unexpected error while sending finished replies; serving on")
                    continue
                # One message per poll: asking ZMQ whether more are queued costs more than polling.
                frames, count = self._receive(router)
                try:
                    request_id, request = self._decode(frames, count)
                    if not isinstance(request, p.Error) and self._is_slow(request):
                        self._dispatch(frames[0], request_id, request)
                    else:
                        self._send(frames[0], request_id, self._call(request))
                except Exception as e:  # noqa: BLE001 - no message may take the loop down
                    logger.exception("Unexpected error while serving a message; serving on")
                    self._send(frames[0], frames[1] if len(frames) > 1 else b"",
                               p.Error(p.ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))

    @staticmethod
    def _receive(router: zmq.Socket) -> tuple[list[bytes], int]:
        """One message, frame by frame: (``[identity, request id, message]``, how many frames
        came). Frames past those three are read and dropped one at a time (the protocol has
        none), so however many a peer sends, this thread holds at most three."""
        frames = [router.recv(zmq.NOBLOCK)]  # copies: faster than Frames when small
        count = 1
        while router.get(zmq.RCVMORE):
            count += 1
            if count <= _KEPT_FRAMES:
                frames.append(router.recv())
            else:
                router.recv(copy=False)
        return frames, count

    def _send(self, identity: bytes, request_id: bytes, reply: p.Reply) -> None:
        try:
            body = p.encode(reply)
        except Exception as e:  # noqa: BLE001 - a reply that cannot be encoded is a bug, not a crash
            logger.exception("Cannot encode a %s reply", type(reply).__name__)
            body = p.encode(p.Error(p.ErrorCode.INTERNAL, f"cannot encode the reply: {type(e).__name__}"))
        try:
            self._router.send_multipart((identity, request_id, body), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("Dropped a reply: the client is not reading its replies")
        except zmq.ZMQError as e:  # e.g. a peer that is gone: its reply goes with it
            logger.warning("Dropped a reply: %s", e)

    def _send_finished(self) -> None:
        while True:
            try:
                identity, request_id, reply = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send(identity, request_id, reply)

    def _is_slow(self, request: p.Request) -> bool:
        if isinstance(request, p.Lookup):  # slow only if it will wait for chunks loading from L2
            return self._lookups is not None and self._engine.lookup_loads(request.scope, request.hashes, request.all_ranks)
        if isinstance(request, (p.ReleaseLocks, p.EndSession)):  # never before the session's slow lookups
            return any(not f.done() for f in self._in_flight.get(("session", request.session), ()))
        return type(request) in self._slow

    def _off_loop(self) -> bool:
        """True on a worker: only there may a Lookup wait for chunks loading from L2."""
        return threading.current_thread() is not self._thread

    def _dispatch(self, identity: bytes, request_id: bytes, request: p.Request) -> None:
        key: str | tuple[str, str] = getattr(request, "instance_id", "")
        pool = self._workers
        if isinstance(request, (p.RegisterKVCache, p.UnregisterKVCache)):
            pool = self._registrar
        elif isinstance(request, (p.Lookup, p.ReleaseLocks, p.EndSession)):
            key = ("session", request.session)
            pool = self._lookups or self._workers
        earlier = [f for f in self._in_flight.get(key, ()) if not f.done()]
        after = earlier if isinstance(request, (p.Fence, p.UnregisterKVCache, p.ReleaseLocks, p.EndSession)) else []
        future = pool.submit(self._run_slow, identity, request_id, request, after)
        self._in_flight[key] = [*earlier, future]
        if len(self._in_flight) > 4096:  # forget engines with nothing in flight
            self._in_flight = {k: v for k, v in self._in_flight.items() if any(not f.done() for f in v)}

    def _run_slow(self, identity: bytes, request_id: bytes, request: p.Request, after: list[Future]) -> None:
        """On a worker thread: runs the request (after ``after``), then hands the reply to the loop thread."""
        if after:
            futures_wait(after)
        self._outbox.put((identity, request_id, self._call(request)))
        with self._bell_lock:  # the PUSH socket is shared by the workers
            try:
                self._bell_tx.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # stopping: the loop is gone and the reply with it

    def _decode(self, frames: list[bytes], count: int) -> tuple[bytes, p.Request | p.Error]:
        """(request id, request) of one ROUTER message ``[identity, request id, message, *bulk]``;
        the request is an Error when the message cannot be accepted."""
        request_id = b""
        try:
            if count > _KEPT_FRAMES and len(frames[1]) <= p.MAX_REQUEST_ID_BYTES:
                request_id = frames[1]  # the envelope is wrong, but whose request it was is known
            if count != _KEPT_FRAMES:
                raise p.ProtocolError(
                    p.ErrorCode.BAD_ENVELOPE, f"expected [request id, message] frames, got {count - 1} frame(s)"
                )
            if len(frames[1]) > p.MAX_REQUEST_ID_BYTES:
                raise p.ProtocolError(
                    p.ErrorCode.BAD_ENVELOPE,
                    f"request id is {len(frames[1])} bytes; the limit is {p.MAX_REQUEST_ID_BYTES}",
                )
            request_id = frames[1]
            size = len(frames[2])
            if size > self._config.max_message_bytes:
                raise p.ProtocolError(
                    p.ErrorCode.TOO_LARGE,
                    f"request is {size} bytes; the limit is {self._config.max_message_bytes}",
                )
            request = p.decode_request(frames[2])
            self._request_counters[type(request)].inc()
            return request_id, request
        except p.ProtocolError as e:
            return request_id, e.to_reply()

    def _call(self, request: p.Request | p.Error) -> p.Reply:
        if isinstance(request, p.Error):
            reply = request
        else:
            try:
                return self._handlers[type(request)](request)
            except UnknownInstanceError as e:
                reply = p.Error(p.ErrorCode.UNKNOWN_INSTANCE, str(e))
            except RequestError as e:
                reply = p.Error(p.ErrorCode.BAD_REQUEST, str(e))
            except Exception as e:  # a bug in a handler must not take the loop down
                logger.exception("Request failed")
                reply = p.Error(p.ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        self._metrics.zmq_errors.labels(code=reply.code.value).inc()
        logger.debug("Error reply %s: %s", reply.code.value, reply.message)
        return reply

    # --- handlers -------------------------------------------------------------------------

    def _unregister(self, r: p.UnregisterKVCache) -> p.Unregistered:
        self._engine.unregister_kv_cache(r.instance_id)
        return p.Unregistered()

    def _hello(self, request: p.Hello) -> p.HelloReply:
        if request.client_name:
            logger.info("Hello from %s (version %s)", request.client_name, request.client_version or "?")
        return p.HelloReply(
            server_version=__version__,
            protocol_version=p.PROTOCOL_VERSION,
            server_id=self._engine.server_id,
            chunk_size=self._config.chunk_size,
            transfer_modes=[m.value for m in self._engine.transfer_modes],
        )


# Replies are built by keyword from named results: a reordered field can never change the wire.
def _store_reply(r: StoreResult) -> p.StoreReply:
    return p.StoreReply(stored=r.stored, present=r.present, skipped=r.skipped, event=r.event)


def _retrieve_reply(r: RetrieveResult) -> p.RetrieveReply:
    return p.RetrieveReply(retrieved=r.retrieved, event=r.event)


def _slots(g: SlotGrant) -> p.Slots:
    return p.Slots(ticket=g.ticket, offsets=g.offsets, present=g.present, skipped=g.skipped)
